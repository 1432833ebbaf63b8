FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY mappings mappings
COPY ontologies ontologies
COPY inference inference
RUN pip install --no-cache-dir .
EXPOSE 8080
CMD ["fedgate", "serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
