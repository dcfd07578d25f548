"""What the loopback Discord knows: users, one guild with its channels, members and messages.

Plain data with the JSON shapes Discord's API uses, so the REST and gateway layers only
serialise. One :class:`World` belongs to one :class:`~listening_core.testing.LocalDiscord`.
"""

from __future__ import annotations

import datetime
import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Account", "Attachment", "Message", "User", "World"]

DISCORD_EPOCH_MS = 1420070400000
#: 2026-03-01T00:00:00Z, the day DAVE became mandatory: where the loopback's ids start.
SNOWFLAKE_BASE_MS = 1772323200000

#: Channel types used here (Discord's numbering).
GUILD_TEXT = 0
GUILD_VOICE = 2


def _iso(ts: datetime.datetime) -> str:
    return ts.isoformat()


@dataclass
class User:
    """A Discord user: a bot account that logs in, or a member played by the loopback."""

    id: int
    name: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        """The user object as Discord sends it."""
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": None if self.bot else self.name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "system": False,
            "public_flags": 0,
            "flags": 0,
        }


@dataclass
class Account:
    """A bot account: its token is what ``discord.Client.start`` is given."""

    user: User
    token: str


@dataclass
class Attachment:
    """A file a bot attached to a message; its bytes are kept and served back under ``url``."""

    id: int
    filename: str
    data: bytes
    content_type: str | None
    url: str

    def payload(self) -> dict[str, Any]:
        """The attachment object as Discord sends it."""
        return {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }


@dataclass
class Message:
    """A message in the guild's text channel."""

    id: int
    channel_id: int
    guild_id: int
    author: User
    content: str
    attachments: list[Attachment] = field(default_factory=list)
    created_at: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))

    def payload(self, member: dict[str, Any] | None = None) -> dict[str, Any]:
        """The message object as Discord sends it (REST answer and MESSAGE_CREATE body)."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "guild_id": str(self.guild_id),
            "author": self.author.payload(),
            "content": self.content,
            "timestamp": _iso(self.created_at),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.payload() for a in self.attachments],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if member is not None:
            data["member"] = member
        return data


class World:
    """Users, one guild (a text channel and voice channels), voice states and messages."""

    def __init__(self, *, guild_name: str = "Loopback Guild", voice_channels: int = 2) -> None:
        self._counter = itertools.count(1)
        self.users: dict[int, User] = {}
        self.accounts: dict[str, Account] = {}
        self.owner: User = self.add_user("guild-owner")
        self.guild_id: int = self.snowflake()
        self.guild_name = guild_name
        self.text_channel_id: int = self.snowflake()
        self.voice_channel_ids: list[int] = [self.snowflake() for _ in range(voice_channels)]
        self.members: dict[int, datetime.datetime] = {self.owner.id: datetime.datetime.now(datetime.UTC)}
        #: user id -> (channel id, voice session id) for members in a voice channel
        self.voice_states: dict[int, tuple[int, str]] = {}
        self.messages: dict[int, Message] = {}
        self.attachments: dict[int, Attachment] = {}

    @property
    def voice_channel_id(self) -> int:
        """The first voice channel: the one tests use unless they say otherwise."""
        return self.voice_channel_ids[0]

    def snowflake(self) -> int:
        """A fresh, increasing Discord-style id.

        Ids are deterministic (one millisecond apart from a fixed instant), so everything keyed by
        user id, such as the relay's per-stream fault generators, is reproducible from a seed.
        """
        n = next(self._counter)
        return ((SNOWFLAKE_BASE_MS + n - DISCORD_EPOCH_MS) << 22) | (n & 0x3FFFFF)

    def add_user(self, name: str, *, bot: bool = False) -> User:
        """A new user with a fresh id (a guild member only after :meth:`add_member`)."""
        user = User(self.snowflake(), name, bot)
        self.users[user.id] = user
        return user

    def add_account(self, name: str) -> Account:
        """A bot user with a token, made a member of the guild."""
        user = self.add_user(name, bot=True)
        token = f"{secrets.token_urlsafe(18)}.{user.id}"
        account = Account(user, token)
        self.accounts[token] = account
        self.add_member(user)
        return account

    def add_member(self, user: User) -> None:
        """Make ``user`` a guild member, joined now (nothing if it already is one)."""
        self.members.setdefault(user.id, datetime.datetime.now(datetime.UTC))

    def member_payload(self, user_id: int, *, with_user: bool = True) -> dict[str, Any]:
        """``user_id``'s guild member object as Discord sends it; ``with_user`` adds the user object."""
        joined = self.members.get(user_id) or datetime.datetime.now(datetime.UTC)
        data: dict[str, Any] = {
            "roles": [],
            "joined_at": _iso(joined),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "avatar": None,
            "pending": False,
        }
        if with_user:
            data["user"] = self.users[user_id].payload()
        return data

    def voice_state_payload(self, user_id: int) -> dict[str, Any]:
        """``user_id``'s voice state as VOICE_STATE_UPDATE carries it (``channel_id`` None out of voice)."""
        channel = self.voice_states.get(user_id)
        return {
            "guild_id": str(self.guild_id),
            "channel_id": None if channel is None else str(channel[0]),
            "user_id": str(user_id),
            "member": self.member_payload(user_id),
            "session_id": "" if channel is None else channel[1],
            "deaf": False,
            "mute": False,
            "self_deaf": False,
            "self_mute": False,
            "self_video": False,
            "suppress": False,
            "request_to_speak_timestamp": None,
        }

    def guild_payload(self) -> dict[str, Any]:
        """The full guild as GUILD_CREATE carries it."""
        everyone = {
            "id": str(self.guild_id),
            "name": "@everyone",
            "permissions": "8",  # administrator: the loopback never refuses on permissions
            "position": 0,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }
        channels: list[dict[str, Any]] = [
            {
                "id": str(self.text_channel_id),
                "type": GUILD_TEXT,
                "name": "general",
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "topic": None,
                "rate_limit_per_user": 0,
                "last_message_id": None,
            }
        ]
        for index, channel_id in enumerate(self.voice_channel_ids):
            channels.append(
                {
                    "id": str(channel_id),
                    "type": GUILD_VOICE,
                    "name": f"Voice {index + 1}",
                    "position": index + 1,
                    "permission_overwrites": [],
                    "bitrate": 64000,
                    "user_limit": 0,
                    "rtc_region": None,
                    "parent_id": None,
                    "nsfw": False,
                    "rate_limit_per_user": 0,
                }
            )
        now = _iso(datetime.datetime.now(datetime.UTC))
        return {
            "id": str(self.guild_id),
            "name": self.guild_name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner.id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [everyone],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": now,
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "members": [self.member_payload(uid) for uid in self.members],
            "channels": channels,
            "threads": [],
            "presences": [],
            "voice_states": [
                {k: v for k, v in self.voice_state_payload(uid).items() if k != "guild_id"}
                for uid in self.voice_states
            ],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def add_message(self, author: User, content: str, attachments: list[Attachment] | None = None) -> Message:
        """Store a new message by ``author`` in the text channel and return it (nothing is dispatched)."""
        message = Message(
            self.snowflake(), self.text_channel_id, self.guild_id, author, content, attachments or []
        )
        self.messages[message.id] = message
        return message
