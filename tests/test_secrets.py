"""Secrets never reach output or files: index tokens in a URL query, a password with an
unencoded '/', a SAS echoed back by a proxy or service, keys in the environment."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from builder.secrets import malformed_userinfo, redact_url, scrub, url_credentials
from tests.helpers import run_cli, write_profile
from tests.support.wheels import build_wheel

TOKEN = "SEKRETtoken4711"
PASSWORD = "pa/ssSEKRET42"


@pytest.fixture
def wheel_index(tmp_path: Path, local_index: Callable[[Iterable[Path]], str]) -> str:
    wheels = [build_wheel(tmp_path / "wheels", "alpha", "1.0")]
    return local_index(wheels)


def test_redact_and_scrub_know_every_shape_of_credential() -> None:
    assert redact_url(f"https://u:{PASSWORD}@host/simple?token={TOKEN}#x") == "https://host/simple"
    assert redact_url(f"http://user:{PASSWORD}@host:8080/simple") == "http://host:8080/simple"
    assert malformed_userinfo(f"http://user:{PASSWORD}@host/simple")
    assert not malformed_userinfo("oci://registry.example/team/repo@sha256:" + "a" * 64)
    assert PASSWORD in url_credentials(f"http://user:{PASSWORD}@host/simple")
    # Passwords holding '#', '?' or '@' are still all userinfo; a fragment is a secret too.
    for password in ("pa#ss1234", "pa?ss1234", "p@ss1234"):
        url = f"https://user:{password}@host/simple"
        assert redact_url(url) == "https://host/simple"
        assert password in url_credentials(url)
        assert password not in scrub(f"error fetching {url}")
    assert "frag4711" in url_credentials("https://host/x#frag4711")
    text = (
        f"GET http://user:{PASSWORD}@host/simple/alpha/ failed; "
        f"see https://acct.blob.core.windows.net/c/b?sv=1&sig={TOKEN}; AccountKey={TOKEN}=="
    )
    scrubbed = scrub(text)
    assert TOKEN not in scrubbed and PASSWORD not in scrubbed and "ssSEKRET" not in scrubbed
    assert "host/simple/alpha/" in scrubbed or "***@host" in scrubbed


def test_an_index_token_in_a_url_query_reaches_no_output_and_no_file(
    tmp_path: Path, wheel_index: str
) -> None:
    profile = write_profile(tmp_path / "profiles", heavy=["alpha==1.0"], python="3.11")
    url = f"{wheel_index}?token={TOKEN}"
    store = tmp_path / "store"
    resolved = run_cli("resolve", str(profile), "--index-url", url)
    assert resolved.returncode == 0, resolved.stderr
    published = run_cli(
        "publish-cache", str(profile), "--store", store.as_uri(), "--index-url", url, "--json"
    )
    assert published.returncode == 0, published.stderr
    script = tmp_path / "init.sh"
    generated = run_cli(
        "init-script", str(profile), "--store", store.as_uri(), "--fallback", "pip",
        "-o", str(script), "--k8s-out", str(tmp_path / "snippet.yaml"),
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    lock = profile.with_suffix(".lock").read_text()
    assert wheel_index in lock  # the index is named, without its token
    outputs = [resolved, published, generated]
    files = [lock, script.read_text(), (tmp_path / "snippet.yaml").read_text()]
    files += [p.read_text() for p in store.rglob("manifest.json")]
    for text in [*(o.stdout + o.stderr for o in outputs), *files]:
        assert TOKEN not in text


def test_a_password_with_an_unencoded_slash_is_refused_without_printing_it(
    tmp_path: Path, wheel_index: str
) -> None:
    profile = write_profile(tmp_path / "profiles", heavy=["alpha==1.0"], python="3.11")
    host = wheel_index.split("://", 1)[1]
    url = f"http://user:{PASSWORD}@{host}"
    for args in (["--index-url", url], ["--index", f"extra={url}"]):
        result = run_cli("resolve", str(profile), *args)
        assert result.returncode == 2, result.stderr
        assert "percent-encode" in result.stderr or "no [[index]] named" in result.stderr
        assert PASSWORD not in result.stderr + result.stdout
        assert "ssSEKRET" not in result.stderr + result.stdout
    assert not profile.with_suffix(".lock").exists()


def test_a_profile_with_credentials_in_an_index_url_is_refused(tmp_path: Path) -> None:
    profile = write_profile(
        tmp_path / "profiles",
        heavy=["alpha==1.0"],
        indexes=[
            {
                "name": "private",
                "url": f"https://u:{TOKEN}@example.invalid/simple",
                "packages": ["alpha"],
            }
        ],
    )
    result = run_cli("resolve", str(profile))
    assert result.returncode == 2
    assert "[index[0].url]" in result.stderr and "committed" in result.stderr
    assert TOKEN not in result.stderr


class _EchoingService(http.server.BaseHTTPRequestHandler):
    """Answers like a misbehaving proxy in front of Azure: the request URL, SAS included, in
    the reason phrase and in the error-code header."""

    def do_GET(self) -> None:
        self.send_response(400, f"Bad Request for {self.path}")
        self.send_header("x-ms-error-code", f"InvalidUri {self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET
    do_PUT = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echoing_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoingService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/devstoreaccount1/cache"
    finally:
        server.shutdown()
        server.server_close()


def test_a_sas_echoed_in_an_azure_error_never_reaches_stderr(
    tmp_path: Path, echoing_service: str
) -> None:
    sas = f"sv=2024-08-04&se=2099-01-01T00%3A00%3A00Z&sr=c&sp=r&sig={TOKEN}%3D"
    digest = "a" * 64
    result = run_cli(
        "fetch", f"{echoing_service}/prof/{digest}?{sas}", "--into", str(tmp_path / "into")
    )
    assert result.returncode == 1, result.stderr
    assert "HTTP 400" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "value",
    [
        f"https://{TOKEN}@example.invalid/simple",
        f"https://example.invalid/simple?token={TOKEN}",
        f"http://user:{PASSWORD}@example.invalid/simple",
        f"https://example.invalid/simple https://u:{TOKEN}@mirror.invalid/simple",
    ],
)
def test_a_build_argument_never_carries_index_credentials(value: str) -> None:
    from builder.errors import BadInputError
    from builder.image import check_build_args

    with pytest.raises(BadInputError, match="image history") as caught:
        check_build_args({"PIP_EXTRA_INDEX_URL": value})
    assert TOKEN not in str(caught.value) and PASSWORD not in str(caught.value)
    check_build_args({"PIP_INDEX_URL": "https://example.invalid/simple"})
