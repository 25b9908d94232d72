"""Batch jobs: a JSONL file of requests (ours or OpenAI Batch API lines) streamed through the engine.

`lines` parses the input (no model needed), `work` prepares each request for the engine and makes its record,
`records` holds the output formats, `runner` is the bounded streaming loop, `output` writes records and scans
them to resume, and `job` is what `jaxllm batch` and `jaxllm generate --input` run.
"""
