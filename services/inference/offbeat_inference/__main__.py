"""`offbeat-inference`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

from offbeat.service import load_service_config, run_service, service_parser
from offbeat_inference.config import InferenceConfig


def main() -> None:
    args = service_parser(
        "inference", "Samples the policy: engines, continuous batching, in-flight weight updates."
    ).parse_args()
    run, config = load_service_config(args, "inference", InferenceConfig)
    if not run.model.path:
        raise SystemExit(
            "offbeat-inference: [model] path is empty: set a Hugging Face id or a local directory"
        )
    from offbeat_inference.service import serve

    run_service("inference", run, config, serve)


if __name__ == "__main__":
    main()
