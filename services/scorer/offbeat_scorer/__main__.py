"""`offbeat-scorer`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

from offbeat.service import load_service_config, run_service, service_parser
from offbeat_scorer.config import ScorerConfig


def main() -> None:
    args = service_parser("scorer", "Scores completions with the environments' rubrics.").parse_args()
    run, config = load_service_config(args, "scorer", ScorerConfig)
    if not (config.tokenizer_path or run.model.path):
        raise SystemExit("offbeat-scorer: [model] path is empty: the scorer detokenizes with its tokenizer")
    from offbeat_scorer.service import serve

    run_service("scorer", run, config, serve)


if __name__ == "__main__":
    main()
