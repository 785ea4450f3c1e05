"""`flux dev demo`: the Bloom Atelier walk-through on a local fleet.

Creates the demo project on v2_shared with sample tables and rows, reads them through
its Service URL, migrates it (dry run, staged, full) with progress shown, then lists
projects and reads the same rows again, now from the dedicated stack.
"""

import json
import ssl
import time

import click
import httpx
import jwt

from cli.client import ApiClient
from cli.config import Settings
from cli.errors import CliError

NAME = "Bloom Atelier"
MIGRATIONS = {
    "001_catalog.sql": """
create table public.products (id bigserial primary key, name text not null, price_cents int not null);
grant select on public.products to authenticated;
grant usage on sequence public.products_id_seq to authenticated;
""",
    "002_orders.sql": """
create table public.orders (id bigserial primary key, customer text not null default auth.uid(),
                            product_id bigint not null references public.products (id), quantity int not null);
alter table public.orders enable row level security;
create policy own_orders on public.orders for all to authenticated
  using (customer = auth.uid()) with check (customer = auth.uid());
grant select, insert on public.orders to authenticated;
grant usage on sequence public.orders_id_seq to authenticated;
insert into public.products (name, price_cents) values
  ('Peony bouquet', 4500), ('Ranunculus bunch', 2800), ('Eucalyptus wreath', 6200);
""",
}
ORDERS = [("ada", 1, 2), ("ada", 3, 1), ("grace", 2, 5)]


class Demo:
    def __init__(self, info: dict, say):
        self.info = info
        self.say = say
        self.api = ApiClient(Settings(info["api_base"], info["token"]))
        self.tls = ssl.create_default_context(cafile=info["gateway_ca"])

    def request(self, method: str, service_url: str, path: str, token: str, body=None):
        host = service_url.removeprefix("https://")
        with httpx.Client(verify=self.tls, timeout=30) as http:
            response = http.request(method, f"{self.info['gateway_url']}{path}", json=body,
                                    headers={"Host": host, "Authorization": f"Bearer {token}"},
                                    extensions={"sni_hostname": host})
        if response.status_code >= 300:
            raise CliError(f"{method} {service_url}{path} answered {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def run(self, migrate_stream) -> dict:
        for project in self.api.get("list"):
            if project["slug"] == "bloom-atelier":
                self.say(f"removing the previous demo project ({project['hash']})")
                # The demo's own throwaway project: no backup needed to remove it.
                self.api.request("DELETE", f"projects/{project['hash']}",
                                 params={"slug": project["slug"], "skipBackupCheck": "true"}, timeout=300)
        created = self.api.post("create", {"name": NAME, "mode": "v2_shared"}, timeout=300)
        slug, hash_ = created["summary"]["slug"], created["summary"]["hash"]
        url, secret = created["summary"]["apiUrl"], created["projectJwtSecret"]
        self.say(f"created {slug} ({hash_}) on v2_shared: {url}")
        pushed = self.api.post("push", {"slug": slug, "hash": hash_,
                                        "files": [{"filename": k, "sql": v} for k, v in MIGRATIONS.items()]})
        self.say(f"pushed {', '.join(pushed['applied'])}")
        # Gateways refuse tokens without `exp`; an hour is plenty for the demo.
        expires = int(time.time()) + 3600
        tokens = {who: jwt.encode({"sub": who, "exp": expires}, secret, algorithm="HS256") for who in ("ada", "grace")}
        for who, product, quantity in ORDERS:
            self.request("POST", url, "/orders", tokens[who], {"product_id": product, "quantity": quantity})
        before = self.request("GET", url, "/orders?select=product_id,quantity&order=id", tokens["ada"])
        self.say(f"ada's orders through the Service URL (pooled): {json.dumps(before)}")

        made = self.api.post(f"projects/{hash_}/backups", {"verify": True}, timeout=600)["backup"]
        if made["restoreVerificationStatus"] != "restore_verified":
            raise CliError(f"the demo's backup did not verify: {made['restoreVerificationError'] or made['error']}")
        self.say(f"backed up {slug} to {made['backupHost']} ({made['rows']} rows) and verified it by a restore "
                 "into a scratch database")
        # A real migrate needs that restore-verified backup: no skipBackupCheck.
        base = {"slug": slug, "hash": hash_, "to": "v1_dedicated", "yes": True, "staged": False, "dumpOnly": False,
                "preserveJwtSecret": True, "newJwtSecret": False, "lockWrites": True, "dropSourceAfter": False,
                "skipBackupCheck": False}
        dry = self.api.post("migrate", {**base, "dryRun": True, "yes": False}, timeout=300)
        self.say("dry run: " + " → ".join(dry["plan"]["steps"]))
        for table in dry["preflight"]["tables"]:
            self.say(f"  {table['name']}: {table['rows']} rows")
        for kind, flags in (("staged", {"staged": True}), ("full", {})):
            self.say(f"migrating ({kind})")
            result = migrate_stream(self.api.stream("migrate", {**base, "dryRun": False, **flags}))
            if not result.get("ok"):
                raise CliError(f"{kind} migrate failed in phase {result.get('phase')}: {result.get('error')}")
            self.say(result["message"])
        listed = self.api.get("list")
        after = self.request("GET", url, "/orders?select=product_id,quantity&order=id", tokens["ada"])
        self.say(f"ada's orders through the same Service URL (dedicated): {json.dumps(after)}")
        if after != before:
            raise CliError("the rows read after the migration differ from those before it")
        return {"project": {"slug": slug, "hash": hash_, "serviceUrl": url}, "before": before, "after": after,
                "list": listed}


def print_list(items: list[dict]) -> None:
    for p in items:
        click.echo(f"  {p['slug']:<20} {p['hash']}  {p['mode']:<13} {p['status']:<8} {p['apiUrl']}")
