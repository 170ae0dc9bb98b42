"""The host's client for one VM's guest agent: HTTP over a channel stream (httpx)."""

from __future__ import annotations

import httpx

from slicer.channel.host import Channel, ChannelTransport
from slicer.channel.yamux import AGENT_PORT
from slicer.core.errors import AgentUnreachable


class AgentClient:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.http = httpx.AsyncClient(
            transport=ChannelTransport(channel, AGENT_PORT), base_url="http://agent", timeout=30.0
        )

    async def _request(self, method: str, path: str, timeout: float, **kw) -> httpx.Response:
        try:
            return await self.http.request(method, path, timeout=timeout, **kw)
        except httpx.HTTPError as e:
            raise AgentUnreachable(f"agent did not answer: {e}") from e

    async def health(self, timeout: float = 10.0) -> dict:
        r = await self._request("GET", "/health", timeout)
        if r.status_code != 200:
            raise AgentUnreachable(f"agent health answered {r.status_code}")
        return r.json()

    async def power(self, action: str, timeout: float = 5.0) -> None:
        r = await self._request("POST", "/power", timeout, params={"action": action})
        if r.status_code != 200:
            raise AgentUnreachable(f"agent refused {action}: {r.text}")

    async def aclose(self) -> None:
        await self.http.aclose()
        self.channel.disconnect()
