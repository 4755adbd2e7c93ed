"""`python -m hrpo.retrieve`: give each question of a retrieval-QA set its top-k passages from a
corpus and write them as prepared records (hrpo.tasks.retrieval builds and caches the index).

    python -m hrpo.retrieve --corpus wiki18.jsonl --task nq --input nq/test.jsonl --output nq_ctx.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hrpo.core.errors import ConfigError, error_line
from hrpo.core.prompts import Example
from hrpo.tasks import get_task
from hrpo.tasks.records import DataError
from hrpo.tasks.registry import load_task
from hrpo.tasks.retrieval import METHODS, TOP_K, attach_contexts, check_options
from hrpo.training.runs import check_writable, replace_file


def prepared_record(ex: Example) -> dict:
    """An example in the project's record form, as `rag-qa` and every QA task read it."""
    return {**ex.meta, "question": ex.question, "golden_answers": ex.answer, "contexts": ex.contexts or []}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m hrpo.retrieve`."""
    p = argparse.ArgumentParser(
        prog="python -m hrpo.retrieve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--corpus", required=True, help="passages: JSONL of {id, contents} or {title, text}")
    p.add_argument(
        "--task", required=True, help="a retrieval-QA task: nq, triviaqa, hotpotqa, 2wiki, bamboogle, rag-qa"
    )
    p.add_argument("--input", required=True, help="the questions: a file, a folder or a hub name")
    p.add_argument("--split", default="test", help="split of a folder or hub dataset (default: test)")
    p.add_argument("--output", required=True, help="the prepared records (JSONL: question, golden_answers, contexts)")
    p.add_argument("--k", type=int, default=TOP_K, help=f"passages per question (default: {TOP_K})")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="bm25",
        help="bm25 (lexical, no weights) or dense (an E5-style encoder: --encoder) (default: bm25)",
    )
    p.add_argument("--encoder", help="--method dense: an E5-style encoder (folder or hub name)")
    p.add_argument("--cache-dir", help="where the index is cached (default: beside the corpus)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args.method, args.encoder, args.k)
        if get_task(args.task).recipe != "rag-qa":
            raise ConfigError(f"--task {args.task} is not a retrieval-QA task")
        out = check_writable(args.output, args.overwrite)
        if not os.path.isfile(args.corpus):
            raise DataError(f"{args.corpus}: no such corpus file")
        examples = load_task(args.task, args.input, split=args.split)
        missing = sum(not ex.contexts for ex in examples)
        examples = attach_contexts(examples, args.corpus, args.k, args.method, args.encoder, args.cache_dir)
        replace_file(out, "".join(json.dumps(prepared_record(ex), ensure_ascii=False) + "\n" for ex in examples))
    except (ValueError, OSError) as err:  # DataError and ConfigError are ValueErrors
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    print(f"{args.task}: {len(examples)} questions, passages retrieved for {missing} from {args.corpus} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
