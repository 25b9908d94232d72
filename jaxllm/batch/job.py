"""A batch job from the command line: check the files, load the model, run the requests with a progress bar,
and say how it went in one line at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from jaxllm.batch.lines import InputFile
from jaxllm.batch.output import Answered, Writer, check_writable, scan
from jaxllm.errors import InvalidRequestError


def run_job(
    path: str,
    load: Callable[[], object],
    defaults: dict,
    output: str | None,
    errors: str | None = None,
    *,
    resume: bool = False,
    strict: bool = False,
    overwrite: bool = False,
    ordered: bool = False,
    window: int | None = None,
) -> int:
    """Run the requests of the JSONL file `path` on the model `load()` returns (called once the files are
    checked), writing records to `output` (stdout when None) and error records to `errors` (default: output).

    defaults: sampling values the lines leave unset; resume: skip what `output` and `errors` already answer
    and append; strict: stop at the first line that cannot run (all lines are checked before the model
    loads); overwrite: write over an `output` with records in it (else refused, unless resuming); ordered:
    records in input order rather than as requests finish; window: requests in flight at most."""
    source = InputFile(path, defaults)
    total = source.count()
    if total == 0:
        raise InvalidRequestError(f"{path} has no requests: write one JSON object per line")
    if strict and (bad := source.first_bad()) is not None:
        raise InvalidRequestError(f"{path} {bad.message}")
    for target in (output, errors):
        if target is not None:
            check_writable(target)
            if not (resume or overwrite) and Path(target).is_file() and Path(target).stat().st_size:
                raise InvalidRequestError(
                    f"{target} already has records: give --resume to continue that job, or remove the file"
                )
    if resume:
        source.answered = Answered()
        scan(output, source.answered)
        scan(errors, source.answered)
    llm = load()
    from jaxllm.batch.runner import BatchRunner

    start = time.perf_counter()
    bar = tqdm(total=total, desc="batch", unit="req", file=sys.stderr, dynamic_ncols=True)
    with Writer(output, errors, append=resume) as writer:

        def sink(record: dict, ok: bool) -> None:
            writer.write(record, ok)
            s = runner.stats
            bar.update(s.done + s.failed + source.skipped - bar.n)
            bar.set_postfix_str(f"{s.tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)

        runner = BatchRunner(llm, sink, window, ordered=ordered, strict=strict, name=path)
        try:
            stats = runner.run(source)
        finally:
            bar.close()
    secs = time.perf_counter() - start
    print(
        f"batch: {stats.done} done, {stats.failed} failed, {source.skipped} skipped as already answered, in "
        f"{secs:.1f} s ({stats.tokens / secs:.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0
