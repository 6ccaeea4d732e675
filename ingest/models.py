"""Pydantic models of Discord Gateway v10 dispatch payloads (the ``d`` of an op 0 frame).

One class per event type, a registry from event name to class, and the two validation entry
points the gateway uses. Celery's ``pydantic=True`` tasks validate the same classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

SNOWFLAKE_MAX: Final = 2**64 - 1


class _SnowflakeSchema:
    """Core schema of a snowflake: a decimal string (what Discord sends) or an int.

    Built from pydantic-core primitives only, so validating one costs no Python call; the string
    branch comes first because it is what the wire carries. A pattern, not int coercion, guards
    the string so ``" 1"``, ``"1.0"`` or ``"-1"`` are refused, and strict int refuses bools/floats.
    """

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        from_string = core_schema.chain_schema(
            [
                core_schema.str_schema(pattern=r"^[0-9]{1,20}$", strict=True),
                core_schema.int_schema(ge=0, le=SNOWFLAKE_MAX),
            ]
        )
        from_int = core_schema.int_schema(ge=0, le=SNOWFLAKE_MAX, strict=True)
        return core_schema.union_schema(
            [from_string, from_int],
            mode="left_to_right",
            custom_error_type="snowflake",
            custom_error_message=(
                "Input should be a snowflake: an integer in 0..2**64-1 or its decimal string"
            ),
        )


# Discord sends ids as strings because JavaScript loses precision past 2**53; we hold ints
# and give strings back whenever we write JSON, so a round trip reproduces the wire format.
Snowflake = Annotated[
    int,
    _SnowflakeSchema(),
    PlainSerializer(str, return_type=str, when_used="json"),
]

# Deep structures few handlers read (embeds, components, activities...) stay plain JSON:
# modelling them would cost validation time on every event for no reader.
JsonObject = dict[str, Any]


class DiscordModel(BaseModel):
    """Base of every Discord payload model.

    ``extra="allow"``: a field Discord adds tomorrow is kept (and re-serialized) instead of
    breaking validation; only declared fields are typed.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    # True when Discord sends ``"d": null`` for this event (RESUMED); the gateway asks this
    # instead of treating a null payload as invalid.
    null_payload: ClassVar[bool] = False


# --------------------------------------------------------------------------- shared objects
#
# The leniency rule: a field is required only when the object is useless without it (the ids
# that route or identify it). Every other field, documented as required or not, defaults to
# None, so "absent" never reads as a made-up value: a partial update without ``roles`` is not
# an update to no roles. Discord adds fields monthly and sends partial objects, and other
# servers (Spacebar) omit keys Discord sends; a dead letter for a missing ``flags`` is our bug.


class AvatarDecorationData(DiscordModel):
    asset: str | None = None
    sku_id: Snowflake | None = None


class PartialUser(DiscordModel):
    """A user of which only ``id`` is guaranteed (PRESENCE_UPDATE sends such users)."""

    id: Snowflake
    username: str | None = None
    discriminator: str | None = None
    global_name: str | None = None
    avatar: str | None = None
    bot: bool | None = None
    system: bool | None = None
    mfa_enabled: bool | None = None
    banner: str | None = None
    accent_color: int | None = None
    locale: str | None = None
    verified: bool | None = None
    email: str | None = None
    flags: int | None = None
    premium_type: int | None = None
    public_flags: int | None = None
    avatar_decoration_data: AvatarDecorationData | None = None


class User(PartialUser):
    """The user object. Only ``id`` is required: MESSAGE_UPDATE sends partial authors, webhook
    authors lack ``global_name`` (discord-api-docs #6463), and other servers omit more."""


class PartialGuildMember(DiscordModel):
    """A guild member as MESSAGE_CREATE/UPDATE attach it: no ``user``, any field may be absent."""

    user: User | None = None
    nick: str | None = None
    avatar: str | None = None
    banner: str | None = None
    roles: list[Snowflake] | None = None
    joined_at: datetime | None = None
    premium_since: datetime | None = None
    deaf: bool | None = None
    mute: bool | None = None
    flags: int | None = None
    pending: bool | None = None
    permissions: str | None = None
    communication_disabled_until: datetime | None = None
    avatar_decoration_data: AvatarDecorationData | None = None


class GuildMember(PartialGuildMember):
    """The guild member object; its identity is ``user.id`` (or the event's ``user``)."""


class RoleTags(DiscordModel):
    # Discord encodes the boolean tags as ``null`` when true and absence when false.
    bot_id: Snowflake | None = None
    integration_id: Snowflake | None = None
    subscription_listing_id: Snowflake | None = None


class Role(DiscordModel):
    id: Snowflake
    name: str | None = None
    color: int | None = None
    colors: JsonObject | None = None
    hoist: bool | None = None
    icon: str | None = None
    unicode_emoji: str | None = None
    position: int | None = None
    # A permission bit set, kept as Discord's decimal string (it outgrows 53 bits).
    permissions: str | None = None
    managed: bool | None = None
    mentionable: bool | None = None
    tags: RoleTags | None = None
    flags: int | None = None


class Emoji(DiscordModel):
    """Emoji object; reactions send the partial form ``{id, name, animated?}``.

    A unicode emoji has a null ``id`` (other servers omit it), a deleted custom emoji a null
    ``name``: neither is required.
    """

    id: Snowflake | None = None
    name: str | None = None
    roles: list[Snowflake] | None = None
    user: User | None = None
    require_colons: bool | None = None
    managed: bool | None = None
    animated: bool | None = None
    available: bool | None = None


class Overwrite(DiscordModel):
    id: Snowflake
    type: int | None = None
    allow: str | None = None
    deny: str | None = None


class ThreadMetadata(DiscordModel):
    archived: bool | None = None
    auto_archive_duration: int | None = None
    archive_timestamp: datetime | None = None
    locked: bool | None = None
    invitable: bool | None = None
    create_timestamp: datetime | None = None


class ThreadMember(DiscordModel):
    # id and user_id are omitted in GUILD_CREATE, where the thread and user are implied.
    id: Snowflake | None = None
    user_id: Snowflake | None = None
    join_timestamp: datetime | None = None
    flags: int | None = None
    member: GuildMember | None = None


class Channel(DiscordModel):
    """Channel object, threads included (they carry ``thread_metadata`` and ``member``)."""

    id: Snowflake
    type: int | None = None
    guild_id: Snowflake | None = None
    position: int | None = None
    permission_overwrites: list[Overwrite] | None = None
    name: str | None = None
    topic: str | None = None
    nsfw: bool | None = None
    last_message_id: Snowflake | None = None
    bitrate: int | None = None
    user_limit: int | None = None
    rate_limit_per_user: int | None = None
    recipients: list[User] | None = None
    icon: str | None = None
    owner_id: Snowflake | None = None
    application_id: Snowflake | None = None
    managed: bool | None = None
    parent_id: Snowflake | None = None
    last_pin_timestamp: datetime | None = None
    rtc_region: str | None = None
    video_quality_mode: int | None = None
    message_count: int | None = None
    member_count: int | None = None
    thread_metadata: ThreadMetadata | None = None
    member: ThreadMember | None = None
    default_auto_archive_duration: int | None = None
    permissions: str | None = None
    flags: int | None = None
    total_message_sent: int | None = None
    available_tags: list[JsonObject] | None = None
    applied_tags: list[Snowflake] | None = None
    default_reaction_emoji: JsonObject | None = None
    default_thread_rate_limit_per_user: int | None = None
    default_sort_order: int | None = None
    default_forum_layout: int | None = None


class Attachment(DiscordModel):
    id: Snowflake
    filename: str | None = None
    title: str | None = None
    description: str | None = None
    content_type: str | None = None
    size: int | None = None
    url: str | None = None
    proxy_url: str | None = None
    height: int | None = None
    width: int | None = None
    ephemeral: bool | None = None
    duration_secs: float | None = None
    waveform: str | None = None
    flags: int | None = None


class Reaction(DiscordModel):
    # The emoji is what the reaction is; counts are optional like everything else.
    emoji: Emoji
    count: int | None = None
    count_details: dict[str, int] | None = None
    me: bool | None = None
    me_burst: bool | None = None
    burst_colors: list[str] | None = None


class MessageReference(DiscordModel):
    type: int | None = None
    message_id: Snowflake | None = None
    channel_id: Snowflake | None = None
    guild_id: Snowflake | None = None
    fail_if_not_exists: bool | None = None


class MentionedUser(User):
    """A user in ``Message.mentions``; gateway events add the partial guild member."""

    member: PartialGuildMember | None = None


class Message(DiscordModel):
    """Message object, with the gateway's ``guild_id`` and ``member`` extras.

    Only ``id`` and ``channel_id`` are required here: MESSAGE_UPDATE may send a partial
    message (an embed unfurled, a pin), and ``referenced_message`` may be partial too.
    MESSAGE_CREATE also requires ``author``. ``referenced_message`` follows the docs exactly:
    absent means "not fetched", null means "the replied-to message was deleted";
    ``model_fields_set`` tells the two apart.
    """

    id: Snowflake
    channel_id: Snowflake
    author: User | None = None
    content: str | None = None
    timestamp: datetime | None = None
    edited_timestamp: datetime | None = None
    tts: bool | None = None
    mention_everyone: bool | None = None
    mentions: list[MentionedUser] | None = None
    mention_roles: list[Snowflake] | None = None
    mention_channels: list[JsonObject] | None = None
    attachments: list[Attachment] | None = None
    embeds: list[JsonObject] | None = None
    reactions: list[Reaction] | None = None
    # Clients send either form; the smart union keeps whichever type arrived.
    nonce: int | str | None = None
    pinned: bool | None = None
    webhook_id: Snowflake | None = None
    type: int | None = None
    activity: JsonObject | None = None
    application: JsonObject | None = None
    application_id: Snowflake | None = None
    flags: int | None = None
    message_reference: MessageReference | None = None
    message_snapshots: list[JsonObject] | None = None
    referenced_message: Message | None = None
    interaction_metadata: JsonObject | None = None
    interaction: JsonObject | None = None
    thread: Channel | None = None
    components: list[JsonObject] | None = None
    sticker_items: list[JsonObject] | None = None
    position: int | None = None
    role_subscription_data: JsonObject | None = None
    resolved: JsonObject | None = None
    poll: JsonObject | None = None
    call: JsonObject | None = None
    guild_id: Snowflake | None = None
    member: PartialGuildMember | None = None


class UnavailableGuild(DiscordModel):
    id: Snowflake
    # Absent in GUILD_DELETE means the bot was removed, rather than an outage.
    unavailable: bool | None = None


class Guild(DiscordModel):
    """Guild object as GUILD_UPDATE sends it; undeclared fields still arrive as extras."""

    id: Snowflake
    name: str | None = None
    icon: str | None = None
    splash: str | None = None
    discovery_splash: str | None = None
    owner_id: Snowflake | None = None
    afk_channel_id: Snowflake | None = None
    afk_timeout: int | None = None
    widget_enabled: bool | None = None
    widget_channel_id: Snowflake | None = None
    verification_level: int | None = None
    default_message_notifications: int | None = None
    explicit_content_filter: int | None = None
    roles: list[Role] | None = None
    emojis: list[Emoji] | None = None
    features: list[str] | None = None
    mfa_level: int | None = None
    application_id: Snowflake | None = None
    system_channel_id: Snowflake | None = None
    system_channel_flags: int | None = None
    rules_channel_id: Snowflake | None = None
    max_presences: int | None = None
    max_members: int | None = None
    vanity_url_code: str | None = None
    description: str | None = None
    banner: str | None = None
    premium_tier: int | None = None
    premium_subscription_count: int | None = None
    preferred_locale: str | None = None
    public_updates_channel_id: Snowflake | None = None
    nsfw_level: int | None = None
    stickers: list[JsonObject] | None = None
    premium_progress_bar_enabled: bool | None = None
    safety_alerts_channel_id: Snowflake | None = None


class VoiceState(DiscordModel):
    guild_id: Snowflake | None = None
    # Null means the user left voice; absent (other servers) reads the same.
    channel_id: Snowflake | None = None
    user_id: Snowflake
    member: GuildMember | None = None
    session_id: str | None = None
    deaf: bool | None = None
    mute: bool | None = None
    self_deaf: bool | None = None
    self_mute: bool | None = None
    self_stream: bool | None = None
    self_video: bool | None = None
    suppress: bool | None = None
    request_to_speak_timestamp: datetime | None = None


class ClientStatus(DiscordModel):
    desktop: str | None = None
    mobile: str | None = None
    web: str | None = None


class Presence(DiscordModel):
    """A presence. Discord warns only ``user.id`` is guaranteed here, so all else is optional."""

    user: PartialUser
    guild_id: Snowflake | None = None
    status: str | None = None
    activities: list[JsonObject] | None = None
    client_status: ClientStatus | None = None


class Interaction(DiscordModel):
    """An interaction: ``id``, ``application_id`` and ``token`` are what answering it needs."""

    id: Snowflake
    application_id: Snowflake
    type: int | None = None
    data: JsonObject | None = None
    guild: JsonObject | None = None
    guild_id: Snowflake | None = None
    channel: Channel | None = None
    channel_id: Snowflake | None = None
    member: GuildMember | None = None
    user: User | None = None
    # The continuation token answers the interaction for 15 minutes: keep it out of reprs.
    token: str = Field(repr=False)
    version: int | None = None
    message: Message | None = None
    app_permissions: str | None = None
    locale: str | None = None
    guild_locale: str | None = None
    entitlements: list[JsonObject] | None = None
    authorizing_integration_owners: dict[str, Snowflake] | None = None
    context: int | None = None
    attachment_size_limit: int | None = None


class ReadyApplication(DiscordModel):
    id: Snowflake
    flags: int | None = None


class AutoModerationAction(DiscordModel):
    type: int | None = None
    metadata: JsonObject | None = None


class RateLimitMetadata(DiscordModel):
    # Only opcode 8 (REQUEST_GUILD_MEMBERS) is rate limited today; other opcodes' metadata
    # will arrive as extras instead of failing validation.
    guild_id: Snowflake | None = None
    nonce: str | None = None


# --------------------------------------------------------------------------- events


class GenericEvent(DiscordModel):
    """Any event without a model of its own: every field is kept as an extra."""


class Ready(DiscordModel):
    # The session reads READY from the raw payload; the model serves handlers and requires
    # only what identifies the session.
    session_id: str
    v: int | None = None
    user: User | None = None
    guilds: list[UnavailableGuild] | None = None
    resume_gateway_url: str | None = None
    shard: tuple[int, int] | None = None
    application: ReadyApplication | None = None


class Resumed(DiscordModel):
    """RESUMED carries ``"d": null``; it validates from null (or ``{}``) to an empty model."""

    null_payload: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        return {} if data is None else data


class RateLimited(DiscordModel):
    # Which command was refused and when to retry: without both the event says nothing.
    opcode: int
    retry_after: float
    meta: RateLimitMetadata | None = None


class GuildCreate(UnavailableGuild):
    """GUILD_CREATE: a full guild with extra fields, or just ``{id, unavailable: true}``.

    One class must accept both shapes (Celery validates the handler argument with one model),
    so every field past ``id`` is optional; ``unavailable`` says which shape arrived.
    """

    name: str | None = None
    icon: str | None = None
    splash: str | None = None
    discovery_splash: str | None = None
    owner_id: Snowflake | None = None
    afk_channel_id: Snowflake | None = None
    afk_timeout: int | None = None
    verification_level: int | None = None
    default_message_notifications: int | None = None
    explicit_content_filter: int | None = None
    roles: list[Role] | None = None
    emojis: list[Emoji] | None = None
    features: list[str] | None = None
    mfa_level: int | None = None
    application_id: Snowflake | None = None
    system_channel_id: Snowflake | None = None
    system_channel_flags: int | None = None
    rules_channel_id: Snowflake | None = None
    max_presences: int | None = None
    max_members: int | None = None
    vanity_url_code: str | None = None
    description: str | None = None
    banner: str | None = None
    premium_tier: int | None = None
    premium_subscription_count: int | None = None
    preferred_locale: str | None = None
    public_updates_channel_id: Snowflake | None = None
    nsfw_level: int | None = None
    stickers: list[JsonObject] | None = None
    premium_progress_bar_enabled: bool | None = None
    safety_alerts_channel_id: Snowflake | None = None
    # GUILD_CREATE extra fields
    joined_at: datetime | None = None
    large: bool | None = None
    member_count: int | None = None
    voice_states: list[VoiceState] | None = None
    members: list[GuildMember] | None = None
    channels: list[Channel] | None = None
    threads: list[Channel] | None = None
    presences: list[Presence] | None = None
    stage_instances: list[JsonObject] | None = None
    guild_scheduled_events: list[JsonObject] | None = None
    soundboard_sounds: list[JsonObject] | None = None


class GuildUpdate(Guild):
    pass


class GuildDelete(UnavailableGuild):
    pass


class GuildMemberAdd(GuildMember):
    user: User
    guild_id: Snowflake


class GuildMemberUpdate(PartialGuildMember):
    guild_id: Snowflake
    user: User


class GuildMemberRemove(DiscordModel):
    guild_id: Snowflake
    user: User


class GuildMembersChunk(DiscordModel):
    guild_id: Snowflake
    members: list[GuildMember] | None = None
    chunk_index: int | None = None
    chunk_count: int | None = None
    # Echoes the ids we asked for, which need not be valid snowflakes.
    not_found: list[Any] | None = None
    presences: list[Presence] | None = None
    nonce: str | None = None


class GuildRoleCreate(DiscordModel):
    guild_id: Snowflake
    role: Role


class GuildRoleUpdate(DiscordModel):
    guild_id: Snowflake
    role: Role


class GuildRoleDelete(DiscordModel):
    guild_id: Snowflake
    role_id: Snowflake


class GuildBanAdd(DiscordModel):
    guild_id: Snowflake
    user: User


class GuildBanRemove(DiscordModel):
    guild_id: Snowflake
    user: User


class GuildEmojisUpdate(DiscordModel):
    guild_id: Snowflake
    emojis: list[Emoji] | None = None


class ChannelCreate(Channel):
    pass


class ChannelUpdate(Channel):
    pass


class ChannelDelete(Channel):
    pass


class ChannelPinsUpdate(DiscordModel):
    guild_id: Snowflake | None = None
    channel_id: Snowflake
    last_pin_timestamp: datetime | None = None


class ThreadCreate(Channel):
    newly_created: bool | None = None


class ThreadUpdate(Channel):
    pass


class ThreadDelete(DiscordModel):
    """THREAD_DELETE sends only these four fields of the channel."""

    id: Snowflake
    guild_id: Snowflake
    parent_id: Snowflake | None = None
    type: int | None = None


class ThreadListSync(DiscordModel):
    guild_id: Snowflake
    channel_ids: list[Snowflake] | None = None
    threads: list[Channel] | None = None
    members: list[ThreadMember] | None = None


class ThreadMembersUpdate(DiscordModel):
    id: Snowflake
    guild_id: Snowflake
    member_count: int | None = None
    added_members: list[ThreadMember] | None = None
    removed_member_ids: list[Snowflake] | None = None


class MessageCreate(Message):
    # Discord always sends the author of a new message, and handlers read it
    # (``message.author.username``): it stays required here, unlike in MESSAGE_UPDATE.
    author: User


class MessageUpdate(Message):
    """MESSAGE_UPDATE: a full message object since API v10, but servers send partial ones
    (no ``mentions``, a partial ``author``, or none): only ``id`` and ``channel_id`` are sure."""


class MessageDelete(DiscordModel):
    id: Snowflake
    channel_id: Snowflake
    guild_id: Snowflake | None = None


class MessageDeleteBulk(DiscordModel):
    ids: list[Snowflake]
    channel_id: Snowflake
    guild_id: Snowflake | None = None


class MessageReactionAdd(DiscordModel):
    user_id: Snowflake
    channel_id: Snowflake
    message_id: Snowflake
    guild_id: Snowflake | None = None
    member: GuildMember | None = None
    emoji: Emoji
    message_author_id: Snowflake | None = None
    # Newer fields (super reactions): absent on older servers and on Spacebar.
    burst: bool | None = None
    burst_colors: list[str] | None = None
    type: int | None = None


class MessageReactionRemove(DiscordModel):
    user_id: Snowflake
    channel_id: Snowflake
    message_id: Snowflake
    guild_id: Snowflake | None = None
    emoji: Emoji
    burst: bool | None = None
    type: int | None = None


class MessageReactionRemoveAll(DiscordModel):
    channel_id: Snowflake
    message_id: Snowflake
    guild_id: Snowflake | None = None


class MessageReactionRemoveEmoji(DiscordModel):
    channel_id: Snowflake
    guild_id: Snowflake | None = None
    message_id: Snowflake
    emoji: Emoji


class _MessagePollVote(DiscordModel):
    # A shared private base, so a removed vote is never an instance of MessagePollVoteAdd.
    user_id: Snowflake
    channel_id: Snowflake
    message_id: Snowflake
    guild_id: Snowflake | None = None
    answer_id: int


class MessagePollVoteAdd(_MessagePollVote):
    pass


class MessagePollVoteRemove(_MessagePollVote):
    pass


class InteractionCreate(Interaction):
    pass


class PresenceUpdate(Presence):
    pass


class TypingStart(DiscordModel):
    channel_id: Snowflake
    guild_id: Snowflake | None = None
    user_id: Snowflake
    # Unix seconds, kept as Discord sends it.
    timestamp: int | None = None
    member: GuildMember | None = None


class UserUpdate(User):
    pass


class VoiceStateUpdate(VoiceState):
    pass


class VoiceServerUpdate(DiscordModel):
    # Anyone holding this token can join the bot's voice session: keep it out of reprs.
    token: str = Field(repr=False)
    guild_id: Snowflake
    # Null while Discord reallocates the voice server.
    endpoint: str | None = None


class WebhooksUpdate(DiscordModel):
    guild_id: Snowflake
    channel_id: Snowflake


class AutoModerationActionExecution(DiscordModel):
    guild_id: Snowflake
    action: AutoModerationAction | None = None
    rule_id: Snowflake
    rule_trigger_type: int | None = None
    user_id: Snowflake
    channel_id: Snowflake | None = None
    message_id: Snowflake | None = None
    alert_system_message_id: Snowflake | None = None
    # Empty unless the MESSAGE_CONTENT intent is granted.
    content: str | None = None
    matched_keyword: str | None = None
    matched_content: str | None = None


# --------------------------------------------------------------------------- registry

EVENT_MODELS: Final[Mapping[str, type[DiscordModel]]] = MappingProxyType(
    {
        "READY": Ready,
        "RESUMED": Resumed,
        "RATE_LIMITED": RateLimited,
        "GUILD_CREATE": GuildCreate,
        "GUILD_UPDATE": GuildUpdate,
        "GUILD_DELETE": GuildDelete,
        "GUILD_MEMBER_ADD": GuildMemberAdd,
        "GUILD_MEMBER_UPDATE": GuildMemberUpdate,
        "GUILD_MEMBER_REMOVE": GuildMemberRemove,
        "GUILD_MEMBERS_CHUNK": GuildMembersChunk,
        "GUILD_ROLE_CREATE": GuildRoleCreate,
        "GUILD_ROLE_UPDATE": GuildRoleUpdate,
        "GUILD_ROLE_DELETE": GuildRoleDelete,
        "GUILD_BAN_ADD": GuildBanAdd,
        "GUILD_BAN_REMOVE": GuildBanRemove,
        "GUILD_EMOJIS_UPDATE": GuildEmojisUpdate,
        "CHANNEL_CREATE": ChannelCreate,
        "CHANNEL_UPDATE": ChannelUpdate,
        "CHANNEL_DELETE": ChannelDelete,
        "CHANNEL_PINS_UPDATE": ChannelPinsUpdate,
        "THREAD_CREATE": ThreadCreate,
        "THREAD_UPDATE": ThreadUpdate,
        "THREAD_DELETE": ThreadDelete,
        "THREAD_LIST_SYNC": ThreadListSync,
        "THREAD_MEMBERS_UPDATE": ThreadMembersUpdate,
        "MESSAGE_CREATE": MessageCreate,
        "MESSAGE_UPDATE": MessageUpdate,
        "MESSAGE_DELETE": MessageDelete,
        "MESSAGE_DELETE_BULK": MessageDeleteBulk,
        "MESSAGE_REACTION_ADD": MessageReactionAdd,
        "MESSAGE_REACTION_REMOVE": MessageReactionRemove,
        "MESSAGE_REACTION_REMOVE_ALL": MessageReactionRemoveAll,
        "MESSAGE_REACTION_REMOVE_EMOJI": MessageReactionRemoveEmoji,
        "MESSAGE_POLL_VOTE_ADD": MessagePollVoteAdd,
        "MESSAGE_POLL_VOTE_REMOVE": MessagePollVoteRemove,
        "INTERACTION_CREATE": InteractionCreate,
        "PRESENCE_UPDATE": PresenceUpdate,
        "TYPING_START": TypingStart,
        "USER_UPDATE": UserUpdate,
        "VOICE_STATE_UPDATE": VoiceStateUpdate,
        "VOICE_SERVER_UPDATE": VoiceServerUpdate,
        "WEBHOOKS_UPDATE": WebhooksUpdate,
        "AUTO_MODERATION_ACTION_EXECUTION": AutoModerationActionExecution,
    }
)


def model_for(event_name: str) -> type[DiscordModel]:
    """The model of dispatch ``event_name``; GenericEvent for names we have no model for."""
    return EVENT_MODELS.get(event_name, GenericEvent)


def validate_event(event_name: str, data: object) -> DiscordModel:
    """Validate an already-parsed ``d``; raises pydantic.ValidationError on a bad payload.

    Each model class compiles its validator once, at import; this only picks it.
    """
    return model_for(event_name).model_validate(data)


def validate_event_json(event_name: str, raw: bytes) -> DiscordModel:
    """Validate the raw JSON bytes of ``d`` without a separate ``json.loads`` pass."""
    return model_for(event_name).model_validate_json(raw)
