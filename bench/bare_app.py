"""The bare-FastAPI ceiling: one endpoint that reads a JSON body and returns a small JSON; no delivery.

Served by bench/bench.py as mailrelay is served (uvicorn, uvloop, httptools):
    uvicorn bench.bare_app:app --loop uvloop --http httptools --log-level warning
"""

from typing import Any

from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/relays/{name}/deliver")
async def deliver(name: str, request: Request) -> dict[str, Any]:
    body = await request.json()
    return {"relay": name, "status": "delivered", "recipients": len(body["recipients"])}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
