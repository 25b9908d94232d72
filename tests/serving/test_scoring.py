"""Scoring through the server: prompt logprobs on /v1/completions with echo, the tokenizer routes, and
lm-evaluation-harness's local-completions model on a local multiple-choice task."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.test_scoring import MC20, TEXT, hf_logprobs, mc20_questions, mc_context


def completion(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": "smollm2", **body}, timeout=120)


def test_echo_with_logprobs_returns_the_prompt_s_logprobs_as_transformers_computes_them(server, hf_smollm2):
    model, _ = hf_smollm2
    ids = server.state.llm.tokenizer.encode(TEXT)
    ref = hf_logprobs(model, ids)
    completion(server, prompt=ids, max_tokens=1, temperature=0)  # now the prefix cache holds the prompt
    for max_tokens in (0, 1):
        r = completion(server, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = np.array(lp["token_logprobs"][1 : len(ids)])
        np.testing.assert_allclose(got, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
        assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
        assert lp["text_offset"][0] == 0 and choice["text"].startswith(server.state.llm.tokenizer.decode(ids))
    assert choice["finish_reason"] == "length"
    # streamed: the same prompt logprobs in the first chunk
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": "smollm2", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0, "stream": True},
        timeout=120,
    ) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = chunks[0]["choices"][0]["logprobs"]["token_logprobs"]
    np.testing.assert_allclose(streamed[1 : len(ids)], got, atol=1e-5)


def test_max_tokens_0_needs_echo(server):
    r = completion(server, prompt="hello", max_tokens=0)
    assert r.status_code == 400 and "max_tokens must be >= 1" in r.json()["error"]["message"]


def test_tokenizer_routes(server):
    tok = server.state.llm.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"prompt": TEXT, "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(TEXT, add_special_tokens=False)
    r = httpx.post(server.url + "/detokenize", json={"model": "smollm2", "tokens": tok.encode(TEXT)})
    assert r.json()["prompt"].endswith(TEXT)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    wrong = httpx.post(server.url + "/tokenize", json={"model": "gpt-4", "prompt": "x"})
    assert wrong.status_code == 404


@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_llm_score_and_transformers(server, hf_smollm2, tmp_path, monkeypatch):
    """lm-evaluation-harness against the running server, on a 20-question multiple-choice task written here:
    the same accuracy as choosing by LLM.score, and as transformers' log-likelihoods on the same weights."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "mc20.yaml").write_text(
        "task: jaxllm_mc20\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {MC20}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    args = f"base_url={server.url}/v1/completions,model=smollm2,tokenizer_backend=remote,num_concurrent=4"
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["jaxllm_mc20"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    harness = results["results"]["jaxllm_mc20"]["acc,none"]

    questions = mc20_questions()
    llm, (model, _) = server.state.llm, hf_smollm2
    contexts = [mc_context(q) for q in questions for _ in q["choices"]]
    continuations = [" " + c for q in questions for c in q["choices"]]
    scores = iter(llm.score(contexts, continuations))
    ours = np.mean([np.argmax([next(scores).logprob for _ in q["choices"]]) == q["answer"] for q in questions])
    hf = []
    for q in questions:
        sums = []
        for c in q["choices"]:
            ctx = llm.tokenizer.encode(mc_context(q))
            ids = llm.tokenizer.encode(mc_context(q) + " " + c)
            ref = hf_logprobs(model, ids)
            sums.append(ref[np.arange(len(ctx) - 1, len(ids) - 1), ids[len(ctx) :]].sum())
        hf.append(np.argmax(sums) == q["answer"])
    assert harness == ours == np.mean(hf), (harness, ours, np.mean(hf))
    assert harness >= 0.5  # well above chance (0.25): the prompt's logprobs are really used
