"""Writing records (one flushed line each) and scanning them back to resume, without a model."""

from __future__ import annotations

import json

import pytest

from jaxllm.batch.lines import BadLine, key_of
from jaxllm.batch.output import Answered, Writer, check_writable, scan
from jaxllm.batch.records import failure, success
from jaxllm.errors import InvalidRequestError


def test_each_record_is_on_disk_as_soon_as_it_is_written(tmp_path):
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    with Writer(str(out), str(err)) as w:
        w.write({"id": "a", "text": "x"})
        assert json.loads(out.read_text()) == {"id": "a", "text": "x"}  # still open: flushed, not buffered
        w.write({"id": "b", "error": {"line": 2}}, ok=False)
        assert err.read_text().count("\n") == 1 and out.read_text().count("\n") == 1
    with Writer(str(out), append=True) as w:
        w.write({"id": "c"}, ok=False)  # without an errors file, errors go to the output
    assert [json.loads(ln)["id"] for ln in out.read_text().splitlines()] == ["a", "c"]


def test_error_records():
    no_body = failure(BadLine(4, None, "invalid_json_line", "invalid JSON (x)"))
    assert no_body["custom_id"] == 4 and no_body["response"] is None
    assert no_body["error"] == {
        "code": "invalid_json_line",
        "message": "line 4: invalid JSON (x)",
        "param": None,
        "line": 4,
    }
    with_body = failure(BadLine(5, "c", "context_length_exceeded", "too long", 400, "max_tokens", True))
    assert with_body["custom_id"] == "c" and with_body["response"]["status_code"] == 400
    assert with_body["response"]["body"]["error"]["message"] == "too long"
    assert with_body["id"].startswith("batch_req_") and with_body["id"] != no_body["id"]


def test_scan_collects_answered_ids_and_error_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [
        {"id": "ours", "text": "x"},
        success("theirs", {"object": "chat.completion"}),
        {"id": 7, "text": "y"},
        failure(BadLine(9, "bad", "invalid_request", "no")),
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    answered = Answered()
    scan(str(out), answered)
    assert answered.keys == {key_of("ours"), key_of("theirs"), key_of(7)}
    assert answered.lines == {9}
    scan(str(tmp_path / "none-yet.jsonl"), answered)  # a job that wrote nothing yet


@pytest.mark.parametrize("tail", [b'{"id": "c", "te', b'{"id": "c"}', b"{broken}\n"])
def test_scan_drops_a_last_line_cut_short(tmp_path, tail):
    out = tmp_path / "out.jsonl"
    whole = b'{"id": "a"}\n{"id": "b"}\n'
    out.write_bytes(whole + tail)
    answered = Answered()
    scan(str(out), answered)
    assert answered.keys == {key_of("a"), key_of("b")}
    assert out.read_bytes() == whole  # appending now continues after the last whole line


def test_scan_refuses_a_file_that_is_not_a_batch_output(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(InvalidRequestError, match="line 2 is not JSON"):
        scan(str(out), Answered())
    out.write_text('{"name": "a"}\n')
    with pytest.raises(InvalidRequestError, match="not a record of a batch job"):
        scan(str(out), Answered())


def test_unwritable_paths(tmp_path):
    with pytest.raises(InvalidRequestError, match="folder does not exist"):
        check_writable(str(tmp_path / "nope" / "out.jsonl"))
    with pytest.raises(InvalidRequestError, match="is a folder"):
        check_writable(str(tmp_path))
