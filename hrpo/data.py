"""`python -m hrpo.data prepare`: turn source files into the project's record form.

    python -m hrpo.data prepare --task gsm8k --input gsm8k/train.jsonl --output prepared/gsm8k_train.jsonl
    python -m hrpo.data prepare --task mmlu --input mmlu_aux_train.jsonl arc/train.jsonl --output prepared/mc.jsonl
    python -m hrpo.data prepare --task nq --input nq_train.jsonl --corpus wiki18.jsonl --output prepared/nq.jsonl

Every record of every input is validated by its task's loader; rejects are reported by reason
with the first place each occurs, duplicates (the same prompt and answer) are dropped and
conflicts (the same prompt with another answer: the first is kept) are reported. The output is
JSONL that every loader reads as is, plus `<output>.report.json`.
"""

from __future__ import annotations

import argparse
import json
import sys

from hrpo.core.errors import error_line
from hrpo.tasks import get_task, task_names
from hrpo.tasks.records import DataError, load_records, prepared_record
from hrpo.tasks.registry import convert_records
from hrpo.tasks.retrieval import attach_contexts
from hrpo.training.runs import check_writable, replace_file, write_json


def prepare(task: str, inputs: list[str], split: str = "train", corpus: str | None = None) -> tuple[list[dict], dict]:
    """(records in the project's form, the report: per input kept/rejected by reason, and the
    duplicates and conflicts dropped across all inputs)."""
    spec = get_task(task)
    if spec.convert is None:
        raise DataError(f"task {task!r} is generated, not prepared from files")
    report = {"task": task, "inputs": [], "duplicates": 0, "conflicts": 0, "conflict_examples": []}
    seen: dict[str, object] = {}
    examples = []
    for path in inputs:
        records, source = load_records(path, split)
        converted, load_report = convert_records(task, records, source)
        print(load_report.summary(), file=sys.stderr)
        report["inputs"].append(
            {
                "source": source,
                "records": load_report.total,
                "kept": load_report.kept,
                "rejected": dict(load_report.reasons),
                "first_at": load_report.first_at,
            }
        )
        for ex in converted:
            key = spec.render(ex)
            if key in seen:
                if seen[key] == ex.answer:
                    report["duplicates"] += 1
                else:
                    report["conflicts"] += 1
                    if len(report["conflict_examples"]) < 5:
                        report["conflict_examples"].append(
                            {"prompt": key[:200], "kept": seen[key], "dropped": ex.answer}
                        )
                continue
            seen[key] = ex.answer
            examples.append(ex)
    if corpus:
        examples = attach_contexts(examples, corpus, k=3)
    report["written"] = len(examples)
    return [prepared_record(ex, task) for ex in examples], report


def build_parser() -> argparse.ArgumentParser:
    """`python -m hrpo.data` with its one command, prepare: a subcommand, so that its usage
    line names it once."""
    p = argparse.ArgumentParser(prog="python -m hrpo.data", description="Data tools; `COMMAND --help` explains one.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="the command to run")
    prepare_cmd = commands.add_parser(
        "prepare",
        help="turn source files into the project's record form",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare_cmd.add_argument(
        "--task",
        required=True,
        choices=[n for n in task_names() if get_task(n).convert],
        help="the task whose loader checks the records",
    )
    prepare_cmd.add_argument("--input", nargs="+", required=True, help="source files (or folders, or hub names)")
    prepare_cmd.add_argument("--split", default="train", help="the split of a folder or hub input (default: train)")
    prepare_cmd.add_argument("--output", required=True, help="JSONL in the project's record form")
    prepare_cmd.add_argument("--corpus", help="QA: retrieve the top 3 passages (BM25) for records without contexts")
    prepare_cmd.add_argument("--overwrite", action="store_true", help="replace --output and its report if they exist")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = check_writable(args.output, args.overwrite)
        report_file = check_writable(f"{args.output}.report.json", args.overwrite)
        records, report = prepare(args.task, args.input, args.split, args.corpus)
        if not records:
            raise DataError("no usable record in any input")
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_file(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        write_json(report_file, report)
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    print(
        f"{args.task}: wrote {len(records)} records to {out} ({report['duplicates']} duplicates and "
        f"{report['conflicts']} conflicts dropped; report {report_file})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
