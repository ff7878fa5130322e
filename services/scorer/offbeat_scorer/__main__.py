"""`offbeat-scorer`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

from offbeat.service import check_model_path, load_service_config, run_service, service_parser
from offbeat_scorer.config import ScorerConfig


def main() -> None:
    args = service_parser("scorer", "Scores completions with the environments' rubrics.").parse_args()
    run, config = load_service_config(args, "scorer", ScorerConfig)
    if config.tokenizer_path:
        check_model_path("scorer", config.tokenizer_path, what="scorer.tokenizer_path")
    else:  # the scorer detokenizes completions with the model's tokenizer
        check_model_path("scorer", run.model.path)
    from offbeat_scorer.service import serve

    run_service("scorer", run, config, serve)


if __name__ == "__main__":
    main()
