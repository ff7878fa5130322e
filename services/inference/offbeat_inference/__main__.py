"""`offbeat-inference`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

from offbeat.service import check_model_path, load_service_config, run_service, service_parser
from offbeat_inference.config import InferenceConfig


def main() -> None:
    args = service_parser(
        "inference", "Samples the policy: engines, continuous batching, in-flight weight updates."
    ).parse_args()
    run, config = load_service_config(args, "inference", InferenceConfig)
    check_model_path("inference", run.model.path)
    from offbeat_inference.service import serve

    run_service("inference", run, config, serve)


if __name__ == "__main__":
    main()
