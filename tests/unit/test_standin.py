"""The PostgREST stand-in's pure parts: JWT checks, filters and error statuses."""

import base64
import hashlib
import hmac
import importlib.util
import json
import pathlib
import time

import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "packaging" / "images" / "postgrest-standin" / "postgrest_standin.py"
spec = importlib.util.spec_from_file_location("postgrest_standin", PATH)
standin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(standin)


def _jwt(claims: dict, secret: bytes, alg: str = "HS256") -> str:
    b64 = lambda data: base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()  # noqa: E731
    head = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}"
    sig = base64.urlsafe_b64encode(hmac.new(secret, head.encode(), hashlib.sha256).digest()).rstrip(b"=")
    return f"{head}.{sig.decode()}"


def test_jwt_signature_expiry_and_algorithm_are_checked():
    secret = b"s" * 32
    assert standin.verify_jwt(_jwt({"role": "web"}, secret), secret) == {"role": "web"}
    with pytest.raises(standin.ApiError, match="InvalidSignature"):
        standin.verify_jwt(_jwt({"role": "web"}, b"x" * 32), secret)
    with pytest.raises(standin.ApiError, match="expired"):
        standin.verify_jwt(_jwt({"exp": int(time.time()) - 5}, secret), secret)
    with pytest.raises(standin.ApiError, match="algorithm"):
        standin.verify_jwt(_jwt({}, secret, alg="none"), secret)
    with pytest.raises(standin.ApiError) as garbage:
        standin.verify_jwt("not.a.jwt", secret)
    assert garbage.value.status == 401


def test_filters_use_parameters_and_quoted_identifiers():
    where, values = standin.parse_filters([("title", "eq.' or 1=1 --"), ("n", "in.(1,2)"), ("done", "is.null"),
                                           ("select", "title")])
    text = where.as_string(None)
    assert text == ' WHERE "title" = %s AND "n" IN (%s, %s) AND "done" IS NULL'
    assert values == ["' or 1=1 --", "1", "2"]
    with pytest.raises(standin.ApiError):
        standin.parse_filters([('x";drop', "eq.1")])
    with pytest.raises(standin.ApiError):
        standin.parse_filters([("x", "regex.1")])


@pytest.mark.parametrize("sqlstate, authenticated, status", [
    ("42501", False, 401), ("42501", True, 403), ("23505", False, 409), ("42P01", True, 404),
    ("P0001", True, 400), ("57014", True, 500), ("08006", True, 503), ("22P02", True, 400),
])
def test_sql_errors_map_to_postgrest_statuses(sqlstate, authenticated, status):
    assert standin.status_for(sqlstate, authenticated) == status
