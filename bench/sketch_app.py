"""The reference sketch: about 50 lines of FastAPI plus a pool of aiosmtplib connections.

Accepts mailrelay's JSON delivery request and sends it through a pool of
SKETCH_POOL (8) connections to SKETCH_SMTP_HOST:SKETCH_SMTP_PORT. No per-recipient
results, no limits, no raw form: what "a quick FastAPI relay" would be.
    SKETCH_SMTP_PORT=2525 uvicorn bench.sketch_app:app --loop uvloop --http httptools
"""

import asyncio
import os
from typing import Any

import aiosmtplib
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

HOST = os.environ.get("SKETCH_SMTP_HOST", "127.0.0.1")
PORT = int(os.environ.get("SKETCH_SMTP_PORT", "25"))


class Delivery(BaseModel):
    sender: str
    recipients: list[str]
    message: str


class Pool:
    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)
        self.idle: list[aiosmtplib.SMTP] = []

    async def send(self, sender: str, recipients: list[str], message: bytes) -> tuple[dict[str, Any], str]:
        async with self.slots:
            client = self.idle.pop() if self.idle else None
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(hostname=HOST, port=PORT, local_hostname="sketch.example.com", start_tls=False)
                await client.connect()
            try:
                result = await client.sendmail(sender, recipients, message)
            except BaseException:
                client.close()
                raise
            self.idle.append(client)
            return result


pool = Pool(int(os.environ.get("SKETCH_POOL", "8")))
app = FastAPI()


@app.post("/relays/{name}/deliver")
async def deliver(name: str, delivery: Delivery) -> dict[str, Any]:
    try:
        refused, reply = await pool.send(delivery.sender, delivery.recipients, delivery.message.encode())
    except aiosmtplib.SMTPException as exc:
        raise HTTPException(503, str(exc)) from None
    return {"relay": name, "status": "partial" if refused else "delivered", "reply": reply}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
