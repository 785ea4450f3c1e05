"""The HTTP client of the controller's API. Every failure becomes a CliError."""

import httpx

from .config import Settings
from .errors import CliError


class ApiClient:
    def __init__(self, settings: Settings, timeout: float = 30):
        self.settings = settings
        headers = {"Accept": "application/json"}
        if settings.token:
            headers["Authorization"] = f"Bearer {settings.token}"
        self._http = httpx.Client(base_url=f"{settings.api_base}/cli/v1/", headers=headers,
                                  timeout=timeout)

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
