"""Print the third-party requirements of the core package or of a service, for image builds.

  python requirements.py pyproject.toml                                 the core's dependencies
  python requirements.py pyproject.toml services/NAME/pyproject.toml    the service's, with its
                                                                        `offbeat[extra,...]` expanded
                                                                        to the core's extras

The Dockerfiles install these before they copy the sources, so editing the code rebuilds only the
last layers of an image, not its dependencies. Standard library only (runs on the base image).
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(core_path: str, service_path: str | None = None) -> list[str]:
    with open(core_path, "rb") as f:
        core = tomllib.load(f)["project"]
    if service_path is None:
        return list(core["dependencies"])
    with open(service_path, "rb") as f:
        service = tomllib.load(f)["project"]
    out: list[str] = []
    for dep in service.get("dependencies", []):
        m = re.fullmatch(r"offbeat(?:\[([^\]]*)\])?\s*", dep)
        if m is None:
            out.append(dep)
            continue
        for extra in filter(None, (e.strip() for e in (m.group(1) or "").split(","))):
            out.extend(core["optional-dependencies"][extra])
    return out


if __name__ == "__main__":
    print("\n".join(requirements(*sys.argv[1:3])))
