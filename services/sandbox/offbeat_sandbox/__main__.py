"""`offbeat-sandbox`: thin entry point; heavy modules are imported only after arguments parse."""

from __future__ import annotations

from offbeat.service import load_service_config, run_service, service_parser
from offbeat_sandbox.config import SandboxConfig


def main() -> None:
    args = service_parser(
        "sandbox", "Runs untrusted code in isolated, resource-limited workers."
    ).parse_args()
    run, config = load_service_config(args, "sandbox", SandboxConfig)
    from offbeat_sandbox.service import serve

    run_service("sandbox", run, config, serve)


if __name__ == "__main__":
    main()
