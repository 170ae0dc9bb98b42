"""Vendored browser assets, fetched from npm at install time (``python3 -m slicer.console.assets``,
run by scripts/install.sh) and checked against the integrity npm publishes, pinned here: xterm.js
for the console's terminals, Swagger UI for an offline ``/docs``.

The page never loads anything from outside the daemon: a host without internet shows it whole.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VENDOR = Path(__file__).resolve().parent / "static" / "vendor"
# package tarball → (npm's sha512 integrity, {file in the tarball: where it goes under VENDOR})
PACKAGES = {
    "https://registry.npmjs.org/@xterm/xterm/-/xterm-5.5.0.tgz": (
        "sha512-hqJHYaQb5OptNunnyAnkHyM8aCjZ1MEIDTQu1iIbbTD/xops91NB5yq1ZK/dC2JDbVWtF23zUtl9JE2NqwT87A==",
        {"package/lib/xterm.js": "xterm.js", "package/css/xterm.css": "xterm.css", "package/LICENSE": "xterm.LICENSE"},
    ),
    "https://registry.npmjs.org/@xterm/addon-fit/-/addon-fit-0.10.0.tgz": (
        "sha512-UFYkDm4HUahf2lnEyHvio51TNGiLK66mqP2JoATy7hRZeXaGMRDr00JiSF7m63vR5WKATF605yEggJKsw0JpMQ==",
        {"package/lib/addon-fit.js": "addon-fit.js"},
    ),
    # /docs: Swagger UI 5 (FastAPI's schema is OpenAPI 3.1, which Swagger UI 4 cannot show)
    "https://registry.npmjs.org/swagger-ui-dist/-/swagger-ui-dist-5.35.0.tgz": (
        "sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ==",
        {"package/swagger-ui-bundle.js": "swagger-ui-bundle.js", "package/swagger-ui.css": "swagger-ui.css",
         "package/LICENSE": "swagger-ui.LICENSE"},
    ),
}


def missing() -> list[str]:
    return [name for _, files in PACKAGES.values() for name in files.values() if not (VENDOR / name).exists()]


def fetch(force: bool = False) -> None:
    VENDOR.mkdir(parents=True, exist_ok=True)
    for url, (integrity, files) in PACKAGES.items():
        if not force and all((VENDOR / name).exists() for name in files.values()):
            continue
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read(16 << 20)
        digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        if digest != integrity:
            raise SystemExit(f"{url}: integrity {digest} is not the pinned {integrity}")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member, name in files.items():
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise SystemExit(f"{url}: {member} missing")
                tmp = VENDOR / (name + ".tmp")
                tmp.write_bytes(extracted.read())
                tmp.replace(VENDOR / name)
        print(f"console assets: {url.rsplit('/', 1)[1]} -> {VENDOR}", file=sys.stderr)


if __name__ == "__main__":
    fetch(force="--force" in sys.argv)
