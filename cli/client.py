"""The HTTP client of the controller's API. Every failure becomes a CliError."""

import json
import ssl

import httpx

from .config import Settings
from .errors import CliError


class ApiClient:
    def __init__(self, settings: Settings, timeout: float = 30):
        self.settings = settings
        headers = {"Accept": "application/json"}
        if settings.token:
            headers["Authorization"] = f"Bearer {settings.token}"
        verify: ssl.SSLContext | bool = True
        if settings.ca_file:
            try:
                verify = ssl.create_default_context(cafile=settings.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise CliError(f"cannot use the CA file {settings.ca_file}: {exc}") from None
        elif settings.api_base.startswith("http://"):
            # No TLS is spoken: a context that trusts nothing, rather than httpx's default, which
            # loads the whole CA bundle (about 65 ms of CPU) for every command.
            verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._http = httpx.Client(base_url=f"{settings.api_base}/cli/v1/", headers=headers,
                                  timeout=timeout, verify=verify)

    def require_login(self) -> "ApiClient":
        if not self.settings.token:
            raise CliError("not logged in: run `flux login --token flx_live_...` or set FLUX_API_TOKEN")
        return self

    def request(self, method: str, path: str, *, json_body: dict | None = None,
                params: dict | None = None, timeout: float | None = None):
        try:
            response = self._http.request(method, path, json=json_body, params=params,
                                          timeout=timeout or self._http.timeout)
        except httpx.HTTPError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise CliError(f"the control plane at {self.settings.api_base} shows a certificate this CLI does "
                               "not trust: give it the fleet CA (ca.pem in the controller's state directory) with "
                               "`flux login --ca-file ca.pem` or FLUX_CA_FILE") from None
            raise CliError(f"cannot reach the control plane at {self.settings.api_base}: {exc}") from None
        try:
            body = response.json() if response.content else {}
        except ValueError:
            raise CliError(f"the control plane at {self.settings.api_base} answered {response.status_code} "
                           "with a body that is not JSON; is FLUX_API_BASE the controller's API?") from None
        if response.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            raise CliError(message or f"request failed with HTTP {response.status_code}")
        return body

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: dict | None = None, **kwargs):
        return self.request("POST", path, json_body=body or {}, **kwargs)

    def events(self, path: str, params: dict):
        """GETs server-sent events and yields the JSON object of each `data:` line as it arrives."""
        try:
            with self._http.stream("GET", path, params=params, headers={"Accept": "text/event-stream"},
                                   timeout=httpx.Timeout(30, read=None)) as response:
                for line in _lines(response):
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.HTTPError as exc:
            raise CliError(f"lost the connection to the control plane at {self.settings.api_base}: {exc}") from None

    def download(self, path: str, params: dict, timeout: float = 6 * 3600):
        """GETs a byte stream; yields (headers, chunk) as the chunks arrive."""
        try:
            with self._http.stream("GET", path, params=params, headers={"Accept": "application/octet-stream"},
                                   timeout=httpx.Timeout(30, read=timeout)) as response:
                if response.status_code >= 400:
                    _lines(response)
                for data in response.iter_bytes():
                    yield response.headers, data
        except httpx.HTTPError as exc:
            raise CliError(f"the download from {self.settings.api_base} broke off: {exc}") from None

    def stream(self, path: str, body: dict | None, timeout: float = 6 * 3600):
        """POSTs `body` (GETs when None) and yields the NDJSON objects of the answer as they arrive."""
        headers = {"Accept": "application/x-ndjson", "Content-Type": "application/json"}
        try:
            with self._http.stream("GET" if body is None else "POST", path, json=body, headers=headers,
                                   timeout=httpx.Timeout(30, read=timeout)) as response:
                for line in _lines(response):
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as exc:
            raise CliError(f"lost the connection to the control plane at {self.settings.api_base}: {exc}; "
                           "the migration goes on there (see `flux migrate --help`)") from None


def _lines(response):
    """The lines of a streamed answer; an error answer raises its message instead."""
    if response.status_code >= 400:
        response.read()
        try:
            message = response.json().get("error")
        except ValueError:
            message = None
        raise CliError(message or f"request failed with HTTP {response.status_code}")
    return response.iter_lines()
