"""A small MLServer runtime serving a TorchScript model from fedgate's Triton-layout repository.

model-settings.json: ``{"name": "<model>", "implementation": "inference.mlserver_runtime.TorchScriptRuntime",
"parameters": {"uri": "<repo>/<model>/<version>/model.pt", "version": "1",
"extra": {"record": "<optional JSON Lines file: one line per request (shape, sha256 of the input)>"}}}``.
Runs inside .venv-mlserver (MLServer's pins conflict with the gateway's), so it imports nothing from fedgate.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TorchScriptRuntime(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        self._model = torch.jit.load(uri, map_location="cpu")
        self._model.eval()
        extra = self.settings.parameters.extra or {}
        self._record = extra.get("record")
        self._output = extra.get("output", "OUTPUT__0")
        self.ready = True
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        if self._record:
            with open(self._record, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "shape": list(x.shape),
                            "sha256": [hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest() for s in x],
                        }
                    )
                    + "\n"
                )
        with torch.inference_mode():
            y = self._model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        out = NumpyCodec.encode_output(self._output, y)
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=[out])
