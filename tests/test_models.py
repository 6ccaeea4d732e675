"""Pins the Gateway payload models against one realistic sample ``d`` per event type.

Table-driven over ``tests/samples/<EVENT>.json``: adding a sample adds it to every check here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from celery import Celery
from pydantic import ValidationError

from ingest.models import (
    EVENT_MODELS,
    SNOWFLAKE_MAX,
    Channel,
    DiscordModel,
    Emoji,
    GenericEvent,
    GuildCreate,
    GuildMember,
    GuildRoleCreate,
    GuildUpdate,
    InteractionCreate,
    MessageCreate,
    MessageDelete,
    MessageReactionAdd,
    MessageUpdate,
    Presence,
    Ready,
    Resumed,
    Role,
    UnavailableGuild,
    User,
    VoiceServerUpdate,
    model_for,
    validate_event,
    validate_event_json,
)
from ingest.testing import spacebar
from ingest.testing.spacebar import SPACEBAR_PAYLOADS

SAMPLES_DIR = Path(__file__).parent / "samples"
SAMPLES = sorted(SAMPLES_DIR.glob("*.json"))
EVENT_NAMES = [path.stem for path in SAMPLES]
# Events whose sample has an object payload (RESUMED's d is null: no fields to check).
OBJECT_EVENT_NAMES = [name for name in EVENT_NAMES if name != "RESUMED"]


def raw_sample(event: str) -> bytes:
    return (SAMPLES_DIR / f"{event}.json").read_bytes()


def sample(event: str) -> Any:
    return json.loads(raw_sample(event))


def _same_json(ours: Any, theirs: Any) -> bool:
    """Equal as JSON, except timestamps, which may differ in spelling but not in instant."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_same_json(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(map(_same_json, ours, theirs))
    if isinstance(ours, str) and isinstance(theirs, str) and ours != theirs:
        try:
            return datetime.fromisoformat(ours) == datetime.fromisoformat(theirs)
        except ValueError:
            return False
    return type(ours) is type(theirs) and ours == theirs


# ------------------------------------------------------------------ the table itself


def test_every_modelled_event_has_exactly_one_sample() -> None:
    assert set(EVENT_NAMES) == set(EVENT_MODELS)


@pytest.mark.parametrize("event", EVENT_NAMES)
def test_sample_validates_to_its_own_model(event: str) -> None:
    model = validate_event(event, sample(event))
    assert type(model) is EVENT_MODELS[event]
    assert model_for(event) is EVENT_MODELS[event]


@pytest.mark.parametrize("event", EVENT_NAMES)
def test_json_bytes_and_parsed_dict_validate_to_the_same_model(event: str) -> None:
    from_bytes = validate_event_json(event, raw_sample(event))
    assert type(from_bytes) is EVENT_MODELS[event]
    assert from_bytes == validate_event(event, sample(event))


@pytest.mark.parametrize("event", OBJECT_EVENT_NAMES)
def test_declared_id_fields_hold_ints(event: str) -> None:
    data = sample(event)
    model = validate_event(event, data)
    declared = type(model).model_fields
    checked = 0
    for key, value in data.items():
        is_id = key == "id" or key.endswith("_id")
        if key in declared and is_id and isinstance(value, str) and value.isdigit():
            assert getattr(model, key) == int(value)
            assert type(getattr(model, key)) is int
            checked += 1
    if event not in {"READY", "RATE_LIMITED", "GUILD_MEMBER_UPDATE", "USER_UPDATE"}:
        assert checked, "sample has no top-level id to check"


@pytest.mark.parametrize("event", EVENT_NAMES)
def test_celery_style_model_validate_accepts_the_decoded_payload(event: str) -> None:
    # What Celery's pydantic=True wrapper calls on the JSON-decoded task argument.
    model_cls = EVENT_MODELS[event]
    model = model_cls.model_validate(
        sample(event), strict=False, context={"celery_task_name": f"discord.{event}"}
    )
    assert isinstance(model, model_cls)


@pytest.mark.parametrize("event", EVENT_NAMES)
def test_json_dump_round_trips_to_an_equal_model(event: str) -> None:
    model = validate_event(event, sample(event))
    dumped = model.model_dump(mode="json")
    # Through real JSON text, as a Celery task message would carry it.
    rebuilt = type(model).model_validate(json.loads(json.dumps(dumped)))
    assert rebuilt == model


@pytest.mark.parametrize("event", OBJECT_EVENT_NAMES)
def test_json_dump_of_set_fields_reproduces_the_wire_payload(event: str) -> None:
    data = sample(event)
    dumped = validate_event(event, data).model_dump(mode="json", exclude_unset=True)
    assert _same_json(dumped, data), f"{event}: dump differs from the sample"


@pytest.mark.parametrize("event", EVENT_NAMES)
def test_unknown_top_level_field_is_kept(event: str) -> None:
    data = sample(event) or {}
    data["field_discord_adds_tomorrow"] = {"nested": [1, "two"]}
    model = validate_event(event, data)
    assert model.model_extra == {"field_discord_adds_tomorrow": {"nested": [1, "two"]}} | {
        k: v for k, v in data.items() if k not in type(model).model_fields
    }
    assert model.model_dump(mode="json")["field_discord_adds_tomorrow"] == {"nested": [1, "two"]}


# ------------------------------------------------------------------ key fields, typed


def test_message_create_fields_are_typed() -> None:
    message = validate_event("MESSAGE_CREATE", sample("MESSAGE_CREATE"))
    assert isinstance(message, MessageCreate)
    assert message.id == 1180187262812459038
    assert message.channel_id == 1094716813404577863
    assert message.guild_id == 1094716812297285652
    assert isinstance(message.author, User)
    assert message.author.id == 80351110224678912
    assert message.author.global_name == "Nelly"
    assert message.timestamp == datetime(2023, 11, 30, 17, 52, 33, 713000, tzinfo=UTC)
    assert message.edited_timestamp is None
    assert message.mentions[0].id == 1097262542370758778
    assert message.mentions[0].bot is True
    assert message.member is not None
    assert message.member.user is None
    assert message.member.roles == [1094717224794501150]
    assert message.nonce == "1180187262242095104"
    assert message.referenced_message is None
    assert "referenced_message" in message.model_fields_set
    assert message.content.startswith("<@1097262542370758778>")


def test_message_update_is_a_full_message() -> None:
    message = validate_event("MESSAGE_UPDATE", sample("MESSAGE_UPDATE"))
    assert isinstance(message, MessageUpdate)
    assert message.edited_timestamp == datetime(2023, 11, 30, 17, 53, 2, 118000, tzinfo=UTC)
    assert message.attachments[0].id == 1180187262552399922
    assert message.attachments[0].size == 2431
    mentioned = message.mentions[0].member
    assert mentioned is not None and mentioned.roles == [1097262839428178012]


def test_reply_carries_its_referenced_message_as_a_message() -> None:
    data = sample("MESSAGE_CREATE")
    original = dict(data, id="1180187101478559815", content="original")
    data.update(type=19, referenced_message=original)
    reply = validate_event("MESSAGE_CREATE", data)
    assert isinstance(reply, MessageCreate)
    assert reply.referenced_message is not None
    assert reply.referenced_message.id == 1180187101478559815
    assert reply.referenced_message.author.id == 80351110224678912


def test_webhook_author_without_global_name_is_accepted() -> None:
    # Discord omits global_name on webhook authors (discord-api-docs #6463).
    data = sample("MESSAGE_CREATE")
    data["author"] = {
        "id": "1180188823745761330",
        "username": "Deploy Hook",
        "discriminator": "0000",
        "avatar": None,
        "bot": True,
    }
    data["webhook_id"] = "1180188823745761330"
    del data["member"]
    message = validate_event("MESSAGE_CREATE", data)
    assert isinstance(message, MessageCreate)
    assert message.author.global_name is None
    assert message.webhook_id == 1180188823745761330


def test_guild_create_nests_models() -> None:
    guild = validate_event("GUILD_CREATE", sample("GUILD_CREATE"))
    assert isinstance(guild, GuildCreate)
    assert guild.unavailable is False
    assert guild.owner_id == 80351110224678912
    assert guild.joined_at == datetime(2023, 4, 17, 9, 11, 40, 117000, tzinfo=UTC)
    assert guild.roles is not None and all(isinstance(r, Role) for r in guild.roles)
    assert guild.roles[2].tags is not None and guild.roles[2].tags.bot_id == 1097262542370758778
    assert guild.emojis is not None and isinstance(guild.emojis[0], Emoji)
    assert guild.members is not None and isinstance(guild.members[0], GuildMember)
    assert guild.members[0].user is not None and guild.members[0].user.id == 80351110224678912
    assert guild.channels is not None and isinstance(guild.channels[0], Channel)
    assert guild.channels[0].permission_overwrites is not None
    assert guild.channels[0].permission_overwrites[0].deny == "2048"
    assert guild.threads is not None and guild.threads[0].thread_metadata is not None
    assert guild.threads[0].thread_metadata.auto_archive_duration == 1440
    assert guild.voice_states is not None and guild.voice_states[0].guild_id is None
    assert guild.voice_states[0].channel_id == 1094716813404577865
    assert guild.presences is not None and isinstance(guild.presences[0], Presence)
    assert guild.presences[0].user.id == 80351110224678912
    assert guild.model_extra is not None and guild.model_extra["lazy"] is True


def test_guild_create_accepts_an_unavailable_guild() -> None:
    guild = validate_event_json("GUILD_CREATE", b'{"id": "41771983423143937", "unavailable": true}')
    assert isinstance(guild, GuildCreate)
    assert guild.id == 41771983423143937
    assert guild.unavailable is True
    assert guild.name is None and guild.members is None


def test_guild_update_still_requires_its_id() -> None:
    with pytest.raises(ValidationError) as info:
        validate_event("GUILD_UPDATE", {"name": "no id"})
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [("missing", ("id",))]


def test_guild_delete_without_unavailable_means_removed() -> None:
    guild = validate_event("GUILD_DELETE", {"id": "41771983423143937"})
    assert isinstance(guild, UnavailableGuild)
    assert guild.unavailable is None


def test_ready_fields_are_typed() -> None:
    ready = validate_event("READY", sample("READY"))
    assert isinstance(ready, Ready)
    assert ready.v == 10
    assert ready.shard == (0, 1)
    assert ready.user.id == 1097262542370758778 and ready.user.bot is True
    assert [g.id for g in ready.guilds] == [1094716812297285652, 1101229345093431296]
    assert ready.application.flags == 565248
    assert ready.resume_gateway_url == "wss://gateway-us-east1-b.discord.gg"


def test_resumed_null_payload_validates_to_an_empty_model() -> None:
    assert model_for("RESUMED").null_payload is True
    assert isinstance(validate_event("RESUMED", None), Resumed)
    assert isinstance(validate_event_json("RESUMED", b"null"), Resumed)
    assert isinstance(Resumed.model_validate(None), Resumed)
    assert Resumed.model_validate(None).model_dump(mode="json") == {}


@pytest.mark.parametrize("event", sorted(set(EVENT_MODELS) - {"RESUMED"}))
def test_null_payload_is_invalid_for_every_other_event(event: str) -> None:
    assert model_for(event).null_payload is False
    with pytest.raises(ValidationError):
        validate_event(event, None)
    with pytest.raises(ValidationError):
        validate_event_json(event, b"null")


def test_interaction_token_stays_out_of_repr() -> None:
    data = sample("INTERACTION_CREATE")
    interaction = validate_event("INTERACTION_CREATE", data)
    assert isinstance(interaction, InteractionCreate)
    assert interaction.token == data["token"]
    assert data["token"] not in repr(interaction)
    assert interaction.member is not None and interaction.member.permissions == "2248473465835073"
    assert interaction.authorizing_integration_owners == {"0": 1094716812297285652}
    assert interaction.channel is not None and interaction.channel.name == "general"


def test_voice_server_token_stays_out_of_repr() -> None:
    update = validate_event("VOICE_SERVER_UPDATE", sample("VOICE_SERVER_UPDATE"))
    assert isinstance(update, VoiceServerUpdate)
    assert update.token == "e1a2b3c4d5f60718"
    assert "e1a2b3c4d5f60718" not in repr(update)


def test_presence_update_accepts_a_user_with_only_an_id() -> None:
    presence = validate_event("PRESENCE_UPDATE", {"user": {"id": "80351110224678912"}})
    assert isinstance(presence, Presence)
    assert presence.user.id == 80351110224678912
    assert presence.status is None


def test_nested_unknown_fields_are_kept() -> None:
    data = sample("MESSAGE_CREATE")
    data["author"]["primary_guild"] = {"tag": "DISC"}
    message = validate_event("MESSAGE_CREATE", data)
    assert isinstance(message, MessageCreate)
    assert message.author.model_extra == {"primary_guild": {"tag": "DISC"}}
    assert message.model_dump(mode="json")["author"]["primary_guild"] == {"tag": "DISC"}


# ------------------------------------------------------------------ leniency: only ids are required
#
# The rule (issue #10): a key is required only if the event is useless without it, i.e. the ids
# that route or identify it (and the object such an id sits in). This table is that rule written
# out per event, as paths into the sample (``*`` is every item of a list); every other key of
# every sample, at any depth, may be absent. The tests below are generated from the samples.

IDENTIFYING: dict[str, set[str]] = {
    "AUTO_MODERATION_ACTION_EXECUTION": {"guild_id", "rule_id", "user_id"},
    "CHANNEL_CREATE": {"id", "permission_overwrites.*.id"},
    "CHANNEL_DELETE": {"id", "permission_overwrites.*.id"},
    "CHANNEL_PINS_UPDATE": {"channel_id"},
    "CHANNEL_UPDATE": {"id", "permission_overwrites.*.id"},
    "GUILD_BAN_ADD": {"guild_id", "user", "user.id"},
    "GUILD_BAN_REMOVE": {"guild_id", "user", "user.id"},
    "GUILD_CREATE": {
        "id",
        "channels.*.id",
        "channels.*.permission_overwrites.*.id",
        "members.*.user.id",
        "presences.*.user",
        "presences.*.user.id",
        "roles.*.id",
        "threads.*.id",
        "voice_states.*.user_id",
    },
    "GUILD_DELETE": {"id"},
    "GUILD_EMOJIS_UPDATE": {"guild_id"},
    "GUILD_MEMBERS_CHUNK": {
        "guild_id",
        "members.*.user.id",
        "presences.*.user",
        "presences.*.user.id",
    },
    "GUILD_MEMBER_ADD": {"guild_id", "user", "user.id"},
    "GUILD_MEMBER_REMOVE": {"guild_id", "user", "user.id"},
    "GUILD_MEMBER_UPDATE": {"guild_id", "user", "user.id"},
    "GUILD_ROLE_CREATE": {"guild_id", "role", "role.id"},
    "GUILD_ROLE_DELETE": {"guild_id", "role_id"},
    "GUILD_ROLE_UPDATE": {"guild_id", "role", "role.id"},
    "GUILD_UPDATE": {"id", "roles.*.id"},
    # The token and application id are what answering the interaction needs.
    "INTERACTION_CREATE": {"id", "application_id", "token", "channel.id", "member.user.id"},
    # Discord always sends a new message's author, and handlers read it.
    "MESSAGE_CREATE": {"id", "channel_id", "author", "author.id", "mentions.*.id"},
    "MESSAGE_DELETE": {"id", "channel_id"},
    "MESSAGE_DELETE_BULK": {"ids", "channel_id"},
    "MESSAGE_POLL_VOTE_ADD": {"user_id", "channel_id", "message_id", "answer_id"},
    "MESSAGE_POLL_VOTE_REMOVE": {"user_id", "channel_id", "message_id", "answer_id"},
    # The emoji is which reaction it is (its own id and name are both nullable).
    "MESSAGE_REACTION_ADD": {"user_id", "channel_id", "message_id", "emoji", "member.user.id"},
    "MESSAGE_REACTION_REMOVE": {"user_id", "channel_id", "message_id", "emoji"},
    "MESSAGE_REACTION_REMOVE_ALL": {"channel_id", "message_id"},
    "MESSAGE_REACTION_REMOVE_EMOJI": {"channel_id", "message_id", "emoji"},
    "MESSAGE_UPDATE": {"id", "channel_id", "author.id", "mentions.*.id", "attachments.*.id"},
    "PRESENCE_UPDATE": {"user", "user.id"},
    # Which command was refused and when to retry.
    "RATE_LIMITED": {"opcode", "retry_after"},
    "READY": {"session_id", "user.id", "guilds.*.id", "application.id"},
    "THREAD_CREATE": {"id"},
    "THREAD_DELETE": {"id", "guild_id"},
    "THREAD_LIST_SYNC": {"guild_id", "threads.*.id"},
    "THREAD_MEMBERS_UPDATE": {"id", "guild_id", "added_members.*.member.user.id"},
    "THREAD_UPDATE": {"id"},
    "TYPING_START": {"channel_id", "user_id", "member.user.id"},
    "USER_UPDATE": {"id"},
    "VOICE_SERVER_UPDATE": {"token", "guild_id"},
    "VOICE_STATE_UPDATE": {"user_id", "member.user.id"},
    "WEBHOOKS_UPDATE": {"guild_id", "channel_id"},
}


def key_paths(value: Any, prefix: str = "") -> Iterator[str]:
    """Every key path in ``value``, ``*`` standing for any list item (``mentions.*.id``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}{key}"
            yield path
            yield from key_paths(item, path + ".")
    elif isinstance(value, list):
        for item in value:
            yield from key_paths(item, prefix + "*.")


def without(value: Any, path: list[str]) -> Any:
    """A copy of ``value`` with the key at ``path`` removed wherever it occurs."""
    head, rest = path[0], path[1:]
    if head == "*":
        return [without(item, rest) for item in value] if isinstance(value, list) else value
    if not isinstance(value, dict) or head not in value:
        return value
    if not rest:
        return {k: v for k, v in value.items() if k != head}
    return {**value, head: without(value[head], rest)}


def sample_paths(event: str) -> list[str]:
    return sorted(set(key_paths(sample(event))))


IDENTIFYING_CASES = [
    (event, path) for event in OBJECT_EVENT_NAMES for path in sorted(IDENTIFYING[event])
]


def test_the_identifying_table_covers_every_event_and_names_real_keys() -> None:
    assert set(IDENTIFYING) == set(OBJECT_EVENT_NAMES)
    for event, paths in IDENTIFYING.items():
        assert paths <= set(sample_paths(event)), f"{event}: {paths - set(sample_paths(event))}"


@pytest.mark.parametrize("event", OBJECT_EVENT_NAMES)
def test_sample_without_any_one_non_identifying_key_still_validates(event: str) -> None:
    refused = {}
    for path in sample_paths(event):
        if path in IDENTIFYING[event]:
            continue
        try:
            model = validate_event(event, without(sample(event), path.split(".")))
        except ValidationError as exc:
            refused[path] = [(e["type"], e["loc"]) for e in exc.errors()]
            continue
        assert type(model) is EVENT_MODELS[event]
    assert not refused, f"{event}: dead-lettered for a missing non-identifying key: {refused}"


@pytest.mark.parametrize(("event", "path"), IDENTIFYING_CASES)
def test_sample_without_an_identifying_key_is_rejected(event: str, path: str) -> None:
    keys = path.split(".")
    with pytest.raises(ValidationError) as info:
        validate_event(event, without(sample(event), keys))
    for error in info.value.errors():
        assert error["type"] == "missing", error
        # The error points at the removed key (list indexes where the path says ``*``).
        loc = [part for part in error["loc"] if not isinstance(part, int)]
        assert loc == [k for k in keys if k != "*"], error


def test_a_missing_optional_field_reads_as_none_not_a_made_up_value() -> None:
    data = sample("GUILD_UPDATE")
    del data["roles"], data["afk_timeout"], data["premium_progress_bar_enabled"]
    guild = validate_event("GUILD_UPDATE", data)
    assert isinstance(guild, GuildUpdate)
    # A partial update without roles is not an update to no roles.
    assert guild.roles is None and guild.afk_timeout is None
    assert guild.premium_progress_bar_enabled is None
    assert "roles" not in guild.model_fields_set
    assert "roles" not in guild.model_dump(mode="json", exclude_unset=True)


def test_message_update_may_come_without_an_author_but_message_create_may_not() -> None:
    data = {"id": "1180187262812459038", "channel_id": "1094716813404577863", "embeds": []}
    update = validate_event("MESSAGE_UPDATE", data)
    assert isinstance(update, MessageUpdate) and update.author is None
    with pytest.raises(ValidationError) as info:
        validate_event("MESSAGE_CREATE", data)
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [("missing", ("author",))]


# ------------------------------------------------------------------ Spacebar's shapes


def test_spacebar_payloads_cover_the_four_shapes_that_were_dead_lettered() -> None:
    assert set(SPACEBAR_PAYLOADS) == {
        "MESSAGE_REACTION_ADD",
        "GUILD_ROLE_CREATE",
        "GUILD_UPDATE",
        "MESSAGE_UPDATE",
    }


@pytest.mark.parametrize("event", sorted(SPACEBAR_PAYLOADS))
def test_spacebar_payload_validates_from_dict_and_json_bytes(event: str) -> None:
    data = SPACEBAR_PAYLOADS[event]
    model = validate_event(event, data)
    assert type(model) is EVENT_MODELS[event]
    assert validate_event_json(event, orjson.dumps(data)) == model
    # Spacebar's own keys are kept, and the dump reproduces what it sent.
    assert _same_json(model.model_dump(mode="json", exclude_unset=True), data)


def test_spacebar_reaction_with_a_unicode_emoji_and_no_burst() -> None:
    reaction = validate_event("MESSAGE_REACTION_ADD", SPACEBAR_PAYLOADS["MESSAGE_REACTION_ADD"])
    assert isinstance(reaction, MessageReactionAdd)
    assert reaction.emoji.id is None and reaction.emoji.name == "\N{THUMBS UP SIGN}"
    assert reaction.burst is None and reaction.type is None
    assert reaction.member is not None and reaction.member.flags is None
    assert reaction.member.user is not None and reaction.member.user.avatar is None


def test_spacebar_role_without_flags() -> None:
    created = validate_event("GUILD_ROLE_CREATE", SPACEBAR_PAYLOADS["GUILD_ROLE_CREATE"])
    assert isinstance(created, GuildRoleCreate)
    assert created.role.id == int(spacebar.ROLE_ID) and created.role.flags is None
    assert created.role.model_extra == {"guild_id": spacebar.GUILD_ID}


def test_spacebar_guild_update_without_its_null_keys() -> None:
    guild = validate_event("GUILD_UPDATE", SPACEBAR_PAYLOADS["GUILD_UPDATE"])
    assert isinstance(guild, GuildUpdate)
    assert guild.name == "spacebar test guild (renamed)"
    assert guild.icon is None and guild.afk_channel_id is None and guild.roles is None
    assert guild.model_extra is not None and guild.model_extra["region"] == "spacebar"


def test_spacebar_partial_message_update() -> None:
    message = validate_event("MESSAGE_UPDATE", SPACEBAR_PAYLOADS["MESSAGE_UPDATE"])
    assert isinstance(message, MessageUpdate)
    assert message.mentions is None and message.mention_roles is None
    assert message.author is not None and message.author.username == "ruby"
    assert message.author.avatar is None and message.author.global_name is None
    assert message.content == "edited on spacebar"


# ------------------------------------------------------------------ rejection


def test_missing_required_field_is_rejected_from_json_bytes() -> None:
    data = sample("MESSAGE_CREATE")
    del data["channel_id"]
    with pytest.raises(ValidationError) as info:
        validate_event_json("MESSAGE_CREATE", orjson.dumps(data))
    assert info.value.errors()[0]["loc"] == ("channel_id",)


def test_wrong_type_in_a_declared_field_is_rejected() -> None:
    data = sample("MESSAGE_CREATE")
    data["timestamp"] = "yesterday"
    with pytest.raises(ValidationError):
        validate_event("MESSAGE_CREATE", data)


@pytest.mark.parametrize(
    "good",
    ["0", 0, "1180187262812459038", 1180187262812459038, str(SNOWFLAKE_MAX), SNOWFLAKE_MAX],
)
def test_snowflake_accepts_decimal_strings_and_ints_in_range(good: object) -> None:
    deleted = MessageDelete.model_validate({"id": good, "channel_id": "1"})
    assert deleted.id == int(str(good))
    assert deleted.model_dump(mode="json")["id"] == str(good)
    assert deleted.model_dump()["id"] == int(str(good))


@pytest.mark.parametrize(
    "bad",
    [
        "abc",
        "",
        " 1",
        "1.0",
        "-1",
        "0x10",
        str(SNOWFLAKE_MAX + 1),
        -1,
        SNOWFLAKE_MAX + 1,
        1.0,
        True,
        None,
    ],
)
def test_snowflake_rejects_non_numbers_and_out_of_range(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        MessageDelete.model_validate({"id": bad, "channel_id": "1"})
    assert info.value.errors()[0]["loc"] == ("id",)


@pytest.mark.parametrize(
    "bad", [b'"nope"', b'"18446744073709551616"', b"18446744073709551616", b"-5"]
)
def test_snowflake_rejects_bad_values_in_json_bytes(bad: bytes) -> None:
    with pytest.raises(ValidationError):
        validate_event_json("MESSAGE_DELETE", b'{"id": ' + bad + b', "channel_id": "1"}')


def test_snowflake_in_a_nested_model_is_checked() -> None:
    data = sample("MESSAGE_CREATE")
    data["author"]["id"] = "not-a-snowflake"
    with pytest.raises(ValidationError) as info:
        validate_event("MESSAGE_CREATE", data)
    assert info.value.errors()[0]["loc"] == ("author", "id")


# ------------------------------------------------------------------ unknown events


def test_unknown_event_validates_as_generic_event_keeping_every_field() -> None:
    assert model_for("SOME_FUTURE_EVENT") is GenericEvent
    payload = {"guild_id": "1094716812297285652", "thing": [1, 2]}
    event = validate_event("SOME_FUTURE_EVENT", payload)
    assert type(event) is GenericEvent
    assert event.model_extra == payload
    assert event.model_dump(mode="json") == payload
    from_bytes = validate_event_json("SOME_FUTURE_EVENT", orjson.dumps(payload))
    assert from_bytes == event


def test_unknown_event_must_still_be_a_json_object() -> None:
    with pytest.raises(ValidationError):
        validate_event_json("SOME_FUTURE_EVENT", b"[1, 2]")


def test_models_are_frozen() -> None:
    deleted = MessageDelete.model_validate(sample("MESSAGE_DELETE"))
    with pytest.raises(ValidationError):
        deleted.id = 1  # type: ignore[misc]  # the runtime check is the point


def test_registry_maps_only_to_discord_models() -> None:
    assert all(issubclass(cls, DiscordModel) for cls in EVENT_MODELS.values())
    with pytest.raises(TypeError):
        EVENT_MODELS["MESSAGE_CREATE"] = GenericEvent  # type: ignore[index]


# ------------------------------------------------------------------ through Celery itself


def test_celery_pydantic_task_receives_models_from_json_payloads() -> None:
    app = Celery("test_models", set_as_current=False)
    app.conf.task_always_eager = True
    seen: list[DiscordModel] = []

    # Celery's task decorator is untyped; the test is about what it does at runtime.
    @app.task(pydantic=True, name="discord.MESSAGE_CREATE", shared=False)  # type: ignore[untyped-decorator]
    def on_message(event: MessageCreate) -> None:
        seen.append(event)

    @app.task(pydantic=True, name="discord.RESUMED", shared=False)  # type: ignore[untyped-decorator]
    def on_resumed(event: Resumed) -> None:
        seen.append(event)

    on_message.delay(sample("MESSAGE_CREATE"))
    on_resumed.delay(None)
    assert isinstance(seen[0], MessageCreate) and seen[0].author.id == 80351110224678912
    assert isinstance(seen[1], Resumed)
