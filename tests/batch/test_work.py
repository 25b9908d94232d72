"""Preparing requests for the engine: embedding lines, which run at once beside the generation in flight."""

from __future__ import annotations

import base64
import json

import numpy as np
from openai.types import CreateEmbeddingResponse

from jaxllm.batch.lines import parse_line
from jaxllm.batch.runner import BatchRunner


def test_embedding_lines_run_beside_generation(tiny_llm):
    def embedding(custom_id, **body):
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body})

    texts = [
        *(
            json.dumps({"id": f"r{i}", "prompt": f"request {i}", "max_tokens": 12, "ignore_eos": True})
            for i in range(3)
        ),
        embedding("e-float", model="m", input=["one text", "another"]),
        embedding("e-b64", model="m", input="one text", dimensions=16, encoding_format="base64"),
        embedding("e-empty", model="m", input=[""]),
        json.dumps({"id": "r3", "prompt": "after", "max_tokens": 4}),
    ]
    records = {}
    runner = BatchRunner(tiny_llm, lambda r, ok: records.update({r.get("custom_id", r["id"]): r}), window=2)
    stats = runner.run(parse_line(t, n, {"temperature": 0}) for n, t in enumerate(texts, 1))
    assert (stats.done, stats.failed) == (6, 1)
    assert records["e-empty"]["response"]["status_code"] == 400
    full = CreateEmbeddingResponse.model_validate(records["e-float"]["response"]["body"])
    want = tiny_llm.embed(["one text", "another"])
    assert full.usage.prompt_tokens == want.prompt_tokens
    np.testing.assert_allclose([d.embedding for d in full.data], want.vectors, atol=1e-5)
    short = records["e-b64"]["response"]["body"]["data"][0]["embedding"]
    vector = np.frombuffer(base64.b64decode(short), "<f4")
    np.testing.assert_allclose(vector, tiny_llm.embed(["one text"], 16).vectors[0], atol=1e-5)
    assert all(len(records[f"r{i}"]["token_ids"]) == 12 for i in range(3))
