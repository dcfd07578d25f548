"""The REST part of the loopback Discord: what discord.py calls over HTTPS.

Enough for ``discord.Client.start``: login, application info, the gateway URL; plus messages
(with attachments, served back from a CDN host) and application-command sync. Anything else
answers 404 with Discord's error shape and is logged, so a missing route is easy to spot.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from .world import Account, Attachment

if TYPE_CHECKING:
    from .server import LocalDiscord

_log = logging.getLogger(__name__)

__all__ = ["ApiError", "RestApi", "json_response"]

API_PREFIX = "/api/v10"


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON answer whose Content-Type is exactly ``application/json`` (discord.py checks it verbatim)."""
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def _error(status: int, message: str, code: int = 0) -> web.Response:
    return json_response({"message": message, "code": code}, status=status)


class ApiError(Exception):
    """Raised by a route to answer with Discord's error shape (the server's middleware sends it)."""

    def __init__(self, status: int, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.response: web.Response = _error(status, message, code)


class RestApi:
    """Route handlers bound to one :class:`~listening_core.testing.LocalDiscord`."""

    def __init__(self, discord: LocalDiscord) -> None:
        self._discord = discord
        self._world = discord.world

    def routes(self) -> list[web.RouteDef]:
        """The aiohttp routes: the REST endpoints under ``/api/v10`` and the CDN's ``/attachments/...``."""
        p = API_PREFIX
        return [
            web.get(p + "/users/@me", self.me),
            web.get(p + "/oauth2/applications/@me", self.application),
            web.get(p + "/applications/@me", self.application),
            web.get(p + "/gateway/bot", self.gateway_bot),
            web.get(p + "/gateway", self.gateway),
            web.post(p + "/channels/{channel_id}/messages", self.create_message),
            web.get(p + "/channels/{channel_id}/messages", self.list_messages),
            web.get(p + "/channels/{channel_id}/messages/{message_id}", self.get_message),
            web.put(p + "/applications/{app_id}/commands", self.put_commands),
            web.put(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.put_commands),
            web.get(p + "/applications/{app_id}/commands", self.empty_list),
            web.get(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.empty_list),
            web.get("/attachments/{channel_id}/{attachment_id}/{filename}", self.attachment),
        ]

    def _account(self, request: web.Request) -> Account | None:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bot ").strip()
        return self._world.accounts.get(token)

    def _authorised(self, request: web.Request) -> Account:
        account = self._account(request)
        if account is None:
            raise ApiError(401, "401: Unauthorized")
        return account

    async def me(self, request: web.Request) -> web.Response:
        """``GET /users/@me``: the bot's user object (401 without a valid token, as every route but
        ``/gateway`` and attachments)."""
        account = self._authorised(request)
        return json_response(account.user.payload())

    async def application(self, request: web.Request) -> web.Response:
        """``GET /applications/@me`` and ``/oauth2/applications/@me``: an application object for the bot
        (the application id is the bot's user id)."""
        account = self._authorised(request)
        return json_response(
            {
                "id": str(account.user.id),
                "name": account.user.name,
                "icon": None,
                "description": "",
                "summary": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self._world.owner.payload(),
                "verify_key": "0" * 64,
                "team": None,
                "flags": 0,
                "bot": account.user.payload(),
            }
        )

    async def gateway_bot(self, request: web.Request) -> web.Response:
        """``GET /gateway/bot``: the loopback gateway URL, one shard and an ample session start limit."""
        self._authorised(request)
        return json_response(
            {
                "url": f"wss://{self._discord.GATEWAY_HOST}",
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def gateway(self, request: web.Request) -> web.Response:
        """``GET /gateway``: the loopback gateway URL (no token needed)."""
        return json_response({"url": f"wss://{self._discord.GATEWAY_HOST}"})

    def _check_channel(self, request: web.Request) -> int:
        channel_id = int(request.match_info["channel_id"])
        if channel_id not in (self._world.text_channel_id, *self._world.voice_channel_ids):
            raise ApiError(404, "Unknown Channel", 10003)
        return channel_id

    async def create_message(self, request: web.Request) -> web.Response:
        """``POST /channels/{channel_id}/messages`` (JSON, or multipart with files): stores the message in
        the text channel, dispatches MESSAGE_CREATE and answers the message object (404 for an unknown
        channel)."""
        account = self._authorised(request)
        self._check_channel(request)
        payload: dict[str, Any] = {}
        files: list[tuple[str, bytes, str | None]] = []
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                elif part.name is not None and part.name.startswith("files"):
                    data = await part.read()
                    files.append((part.filename or "file", bytes(data), part.headers.get("Content-Type")))
        else:
            payload = await request.json()
        attachments = []
        for filename, data, content_type in files:
            attachment_id = self._world.snowflake()
            url = (
                f"https://{self._discord.CDN_HOST}/attachments/{self._world.text_channel_id}/"
                f"{attachment_id}/{filename}"
            )
            attachment = Attachment(attachment_id, filename, data, content_type, url)
            self._world.attachments[attachment_id] = attachment
            attachments.append(attachment)
        message = self._world.add_message(account.user, str(payload.get("content") or ""), attachments)
        await self._discord.gateway.dispatch_message(message)
        return json_response(message.payload())

    async def list_messages(self, request: web.Request) -> web.Response:
        """``GET /channels/{channel_id}/messages``: the channel's last ``limit`` messages (default 50),
        newest first; ``before``, ``after`` and ``around`` are ignored."""
        channel_id = self._check_channel(request)
        self._authorised(request)
        limit = int(request.query.get("limit", "50"))
        found = [m for m in self._world.messages.values() if m.channel_id == channel_id]
        return json_response([m.payload() for m in reversed(found[-limit:])])

    async def get_message(self, request: web.Request) -> web.Response:
        """``GET /channels/{channel_id}/messages/{message_id}``: the message object, or 404 Unknown Message
        (10008)."""
        self._check_channel(request)
        self._authorised(request)
        message = self._world.messages.get(int(request.match_info["message_id"]))
        if message is None:
            return _error(404, "Unknown Message", 10008)
        return json_response(message.payload())

    async def put_commands(self, request: web.Request) -> web.Response:
        """``PUT /applications/{app_id}/commands`` (global or guild): answers the submitted commands with
        fresh ids and defaults filled in; nothing is stored."""
        account = self._authorised(request)
        commands = await request.json()
        answer = []
        for command in commands:
            answer.append(
                {
                    "id": str(self._world.snowflake()),
                    "application_id": str(account.user.id),
                    "version": str(self._world.snowflake()),
                    "default_member_permissions": None,
                    "type": 1,
                    "description": "",
                    "options": [],
                    **command,
                }
            )
        return json_response(answer)

    async def empty_list(self, request: web.Request) -> web.Response:
        """``GET /applications/{app_id}/commands`` (global or guild): an empty list."""
        self._authorised(request)
        return json_response([])

    async def attachment(self, request: web.Request) -> web.Response:
        """``GET /attachments/{channel_id}/{attachment_id}/{filename}`` (``cdn.discordapp.com``): the
        stored file's bytes with its content type, or 404."""
        found = self._world.attachments.get(int(request.match_info["attachment_id"]))
        if found is None:
            return _error(404, "Not Found")
        return web.Response(body=found.data, content_type=found.content_type or "application/octet-stream")

    async def not_found(self, request: web.Request) -> web.Response:
        """The answer to a request no route serves: logged at WARNING, then 404 in Discord's error shape."""
        _log.warning("loopback Discord: no route for %s %s", request.method, request.path)
        return _error(404, "404: Not Found")
