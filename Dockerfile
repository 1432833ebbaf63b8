FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY mappings mappings
COPY ontologies ontologies
COPY inference inference
COPY openapi openapi
COPY demo demo
# tritonclient: the image dispatches to the Triton service (docker-compose); torch (the embedded backend) is
# left out of the image on purpose (GBs of CUDA wheels) — install fedgate[ml] where the embedded backend is wanted
RUN pip install --no-cache-dir -e . "tritonclient[grpc,http]>=2.40"  # editable: openapi/, demo/ and the model repository resolve under /app
EXPOSE 8080 11112
CMD ["fedgate", "serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
