"""The Fleet API proxy (deploy/nginx/): it forwards exactly the SuperLink's Fleet API routes.

The end-to-end check (SuperNodes training through the proxy while the Control API is
refused at the public address) is test_deployment.py's local cluster test.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "nginx" / "fleet-proxy.conf"
sys.path.insert(0, str(ROOT / "deploy"))

import local_cluster  # noqa: E402


def _forwarded() -> re.Pattern:
    """The one location the template proxies (its regex); everything else gets 403."""
    text = TEMPLATE.read_text()
    proxied = re.findall(r"location ~ (\S+) \{(?:[^{}]|\{[^{}]*\})*?proxy_pass", text)
    assert len(proxied) == 1, proxied
    assert re.search(r"location / \{\s*return 403;\s*\}", text)
    return re.compile(proxied[0])


def _superlink_routes() -> list[str]:
    """Every path flower-superlink's HTTP server answers (Fleet, Control, Runtime APIs, docs, health)."""
    from fastapi.routing import iter_route_contexts
    from flwr.superlink import main

    return sorted({context.path for context in iter_route_contexts(main.app.routes)})


def test_proxy_forwards_the_fleet_api_and_nothing_else() -> None:
    forwarded = _forwarded()
    routes = _superlink_routes()

    fleet = [path for path in routes if forwarded.match(path)]

    assert fleet == [path for path in routes if path.startswith("/v1/fleet/")] and len(fleet) == 12
    assert any(path.startswith("/v1/control/") for path in routes)  # there is something to refuse
    for refused in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node",
                    "/v1/runtime/get-nodes", "/flwr.proto.Control/ListRuns", "/flwr.proto.Fleet/PullMessages",
                    "/docs", "/openapi.json", "/v1/fleet/", "/v1/fleet/pull-messages/x"):
        assert not forwarded.match(refused), refused


def test_supernode_client_uses_only_forwarded_routes() -> None:
    from flwr.supernode import fleet_http_client

    used = re.findall(r'path="(/v1/[^"]+)"', Path(fleet_http_client.__file__).read_text())

    assert used and all(_forwarded().match(path) for path in used), used


def test_rendered_configuration_is_accepted_by_nginx(tmp_path: Path) -> None:
    nginx = local_cluster.find_nginx()
    assert nginx, "nginx is needed for the Fleet API proxy: apt-get install nginx (make test-tools does)"
    certs, _ = local_cluster.make_credentials(tmp_path, ["node-0"])

    config = local_cluster.write_proxy_config(tmp_path, "127.0.0.1:9443", "127.0.0.1:9091", certs)

    text = config.read_text() + (tmp_path / "nginx" / "fleet-proxy.conf").read_text()
    assert "@" not in re.sub(r"#.*", "", text)  # every placeholder filled
    result = subprocess.run([nginx, "-t", "-p", str(config.parent), "-c", str(config),
                             "-e", str(tmp_path / "logs" / "proxy-error.log")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_missing_placeholder_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="@CA@"):
        local_cluster.render(TEMPLATE, {"LISTEN": "x", "CERTIFICATE": "x", "CERTIFICATE_KEY": "x",
                                        "SUPERLINK": "x", "SUPERLINK_NAME": "x"})


def test_local_cluster_without_nginx_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture, tiny_vit_cache: Path) -> None:
    import yaml

    experiment = tmp_path / "x.yaml"
    experiment.write_text(yaml.safe_dump({"backbone": {"cache": str(tiny_vit_cache)},
                                          "data": {"domains": ["clean", "sketch"]},
                                          "clients": {"capacities": [2, 1]}}))
    monkeypatch.setattr(local_cluster, "find_nginx", lambda: None)
    monkeypatch.setattr(local_cluster, "stop_on_signals", lambda: None)  # pytest keeps its own handlers

    code = local_cluster.main(["--workdir", str(tmp_path / "cluster"), "--max-layers", "2,1",
                               "-c", f"experiment='{experiment}'"])

    assert code == 2
    assert "apt-get install nginx" in capsys.readouterr().err
    assert not (tmp_path / "cluster").exists()  # nothing was started or written
