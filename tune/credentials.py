"""Credentials in URIs: found the way each URI's client reads it, and never repeated.

A job's config is saved in its folder and logged to MLflow as params, and URIs appear in
messages, so `tune.config` refuses any URI that carries a credential. A database URL is parsed
as SQLAlchemy parses it (a password may hold '/'; a query parameter reaches the driver), any
other URI as urllib (and requests) do.
"""

from __future__ import annotations

import re
import urllib.parse

from tune.errors import ConfigError

# Schemes SQLAlchemy (Optuna's study storage, MLflow's database stores) connects to; such a URL
# is parsed as SQLAlchemy parses it (a password may hold '/'; a query parameter reaches the driver).
_DATABASE_SCHEMES = frozenset(
    {"postgresql", "postgres", "mysql", "mariadb", "sqlite", "mssql", "oracle", "cockroachdb"}
)
# Schemes whose user info is a credential even without a password: requests sends `TOKEN@host`
# as a login, pyarrow reads `KEY:SECRET@bucket`. Other schemes may name a user (postgresql,
# hdfs) or an Azure container (abfs://CONTAINER@ACCOUNT...), never a password.
_USERINFO_IS_SECRET = frozenset(
    {"http", "https", "ws", "wss", "s3", "s3a", "s3n", "gs", "gcs", "ray"}
)
# Query parameters that carry a secret, matched lowercased without '-' and '_': libpq's password
# and sslpassword (its passfile, sslkey and sslcert are file paths, and fine), MySQL's passwd,
# tokens, API and account keys, and the signature and credential of a pre-signed URL.
_SECRET_PARAM = re.compile(
    r"pass(word|wd)?$|pwd$|secret|token|credential|signature|^sig$"
    r"|^(api|access|account|private|shared|master)?key$"
)
# What to do instead, by (config key, scheme family), else by family alone (key None).
_CREDENTIAL_ADVICE: dict[tuple[str | None, str], str] = {
    (None, "database"): "remove it and give the password through the environment: PGPASSWORD "
    "or ~/.pgpass (mode 600) for PostgreSQL, the driver's own option file for another database",
    ("tracking.tracking_uri", "http"): "remove it and give MLflow the credentials through the "
    "environment: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    ("data.source", "http"): "toxtune downloads without credentials: download the file "
    "yourself and pass its local path with --data",
    (None, "s3"): "remove it and give the credentials through the environment: "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance profile)",
    (None, "gs"): "remove it and give the credentials through the environment: "
    "GOOGLE_APPLICATION_CREDENTIALS",
    ("ray.address", "ray"): "remove it: a Ray address takes no credentials "
    "(HOST:PORT, auto or ray://HOST:PORT)",
    (None, "other"): "remove it and give the credentials through the environment variables of "
    "the service it names",
}
_FAMILY = {
    **dict.fromkeys(_DATABASE_SCHEMES, "database"),
    **dict.fromkeys(("http", "https", "ws", "wss"), "http"),
    **dict.fromkeys(("s3", "s3a", "s3n"), "s3"),
    **dict.fromkeys(("gs", "gcs"), "gs"),
}


def credential_in(where: str, uri: str) -> tuple[str, str] | None:
    """(what, family) when `uri` carries a credential; the credential itself is never returned.

    ConfigError, without the value, for a database URL SQLAlchemy cannot parse."""
    if "://" not in uri:  # a local path, or a Ray address (auto, HOST:PORT: never a USER@)
        if where == "ray.address" and "@" in uri:
            return "a credential in its user info (USER@)", "ray"
        return None
    scheme = uri.split("://", 1)[0].lower()
    family = "ray" if where == "ray.address" else _FAMILY.get(scheme.split("+")[0], "other")
    if where == "tracking.study_storage" or family == "database":
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(uri)
        except (ArgumentError, ValueError):
            raise ConfigError(
                f"{where} is not a database URL SQLAlchemy can parse (the value is not shown: "
                "it may hold a credential); give DIALECT://USER@HOST[:PORT]/DATABASE, e.g. "
                "postgresql://optuna@db/optuna, or sqlite:///PATH"
            ) from None
        user, password, params = url.username, url.password, list(url.query)
    else:
        parsed = urllib.parse.urlsplit(uri)
        user, password = parsed.username, parsed.password
        params = [name for name, _ in urllib.parse.parse_qsl(parsed.query, True)]
        try:
            parsed.port  # noqa: B018  (a property that raises for a port that is not a number)
        except ValueError:
            # USER:PASS/WORD@HOST: the '/' ends the host part early, so the password is read
            # as a port, and a client's error would repeat it
            password = password or ("@" in parsed.path)
    if password:
        return "a password in its user info (USER:PASSWORD@)", family
    if user and (scheme in _USERINFO_IS_SECRET or family == "ray"):
        return (
            "a credential in its user info (a USER@ is a login, token or key to this scheme)",
            family,
        )
    for name in params:
        if _SECRET_PARAM.search(name.lower().replace("-", "").replace("_", "")):
            return f"a credential in its query parameter {name!r}", family
    return None


def credential_advice(where: str, family: str) -> str:
    """What to do instead of putting a credential of `family` into config key `where`."""
    return (
        _CREDENTIAL_ADVICE.get((where, family))
        or _CREDENTIAL_ADVICE.get((None, family))
        or _CREDENTIAL_ADVICE[None, "other"]
    )
