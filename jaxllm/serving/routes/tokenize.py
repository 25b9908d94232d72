"""POST /tokenize, POST /detokenize and GET /tokenizer_info: the served model's tokenizer, as vLLM offers it
(evaluation harnesses such as lm-evaluation-harness tokenize through these instead of loading the tokenizer
themselves)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from jaxllm.errors import InvalidRequestError
from jaxllm.serving.protocol import DetokenizeRequest, TokenizeRequest
from jaxllm.serving.routes.common import parse_body


async def tokenize(request: Request):
    state = request.app.state.server
    req = await parse_body(request, state, TokenizeRequest)
    tokens = state.model.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": state.model.max_model_len})


async def detokenize(request: Request):
    state = request.app.state.server
    req = await parse_body(request, state, DetokenizeRequest)
    vocab = state.model.config.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": state.model.tokenizer.decode(req.tokens, skip_special_tokens=False)})


async def tokenizer_info(request: Request):
    state = request.app.state.server
    tok = state.model.tokenizer
    return JSONResponse(
        {
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": None,
            "chat_template": tok.chat_template,
            "model_max_length": state.model.max_model_len,
            "add_bos_token": tok.add_bos,
        }
    )
