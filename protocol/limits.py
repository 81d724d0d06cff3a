"""Hard limits of the wire protocol.

Every bound a decoder enforces is named here, so both sides agree on them and the
unpacker's allocation limits are derived from the same numbers as the schema checks.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_SEEDS_PER_ROUND",
    "MAX_MODE_SETTINGS",
    "MAX_TABLE_ENTRIES",
    "MAX_SYNC_ROUNDS",
    "MAX_STRING_CHARS",
    "MAX_STRING_BYTES",
    "MAX_ID_CHARS",
    "MAX_BYTES_FIELD",
    "MAX_NESTING_DEPTH",
    "MAX_MAP_KEYS",
    "MAX_EXAMPLES",
    "MAX_SAFE_INT",
    "MAX_ROUND",
    "SEED_BITS",
    "MAX_SEED",
    "MAX_VERSION_NUMBER",
    "MAX_SUPPORTED_VERSIONS",
    "MAX_LORA_RANK",
    "MAX_LORA_TARGETS",
    "MAX_LORA_LAYERS",
    "MAX_LAYER_INDEX",
    "MIN_SERVER_NONCE_BYTES",
    "MAX_SERVER_NONCE_BYTES",
    "NONCE_BYTES",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_MAJOR_VERSIONS",
]

# A full table sync of 65,536 entries is ~1.2 MiB as float64 msgpack; 4 MiB leaves room
# for the round history that comes with it while bounding what one frame can cost.
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024

# One forward-difference estimate per seed; a round of more steps than this is not an
# edge-device workload, and it bounds update/task/commit sizes to ~80 KiB.
MAX_SEEDS_PER_ROUND: Final = 4096
# Entries of round_task.settings (a mode's settings for the round).
MAX_MODE_SETTINGS: Final = 16

# Seeds with a nonzero accumulated total between rebases; the largest list on the wire.
MAX_TABLE_ENTRIES: Final = 65536

# Rounds replayed in one sync response; a client further behind gets a table snapshot.
MAX_SYNC_ROUNDS: Final = 4096

# Human-readable strings (messages, names, reasons): enough for a sentence or a path.
MAX_STRING_CHARS: Final = 512

# UTF-8 needs at most 4 bytes per character; the unpacker's byte limit for strings.
MAX_STRING_BYTES: Final = 4 * MAX_STRING_CHARS

# Identifiers (client and federation ids) are short, ASCII and safe in file names.
MAX_ID_CHARS: Final = 64

# Binary fields are nonces, keys and signatures (a few dozen bytes) and, since 2.1, a
# packed update's values: at most 4 bytes (f32) for each of MAX_SEEDS_PER_ROUND seeds.
MAX_BYTES_FIELD: Final = 4 * MAX_SEEDS_PER_ROUND

# The deepest valid value is sync_response.rounds[i].coefficients[j] (5 levels).
MAX_NESTING_DEPTH: Final = 8

# The largest map has 13 keys (federation info); the unpacker refuses bigger maps.
MAX_MAP_KEYS: Final = 32

# Examples behind one update; far above any device's share, small enough to weight by.
MAX_EXAMPLES: Final = 10**9

# Integers stay exactly representable in IEEE float64, so JavaScript peers agree.
MAX_SAFE_INT: Final = 2**53 - 1

# Round numbers are counters that must survive a JavaScript peer.
MAX_ROUND: Final = MAX_SAFE_INT

# Seeds are 0 <= s < 2**63: fits int64 and uint64 alike in every msgpack implementation.
SEED_BITS: Final = 63

# The largest valid seed.
MAX_SEED: Final = 2**SEED_BITS - 1

# Major and minor version numbers fit an unsigned 16-bit integer.
MAX_VERSION_NUMBER: Final = 2**16 - 1

# A reject lists the versions the coordinator speaks; a handful at most.
MAX_SUPPORTED_VERSIONS: Final = 16

# LoRA ranks above this defeat the purpose of a low-rank scope.
MAX_LORA_RANK: Final = 1024

# Target module names of a LoRA scope (e.g. q_proj, v_proj); a model has a few dozen kinds.
MAX_LORA_TARGETS: Final = 64

# Decoder layers a LoRA scope may be restricted to (ScopeSpec.lora_layers), and the
# largest layer index it may name; the largest open models have a few hundred layers.
MAX_LORA_LAYERS: Final = 1024
MAX_LAYER_INDEX: Final = 65535

# The coordinator's challenge nonce: at least 128 bits of entropy.
MIN_SERVER_NONCE_BYTES: Final = 16

# ... and no more than a 512-bit value.
MAX_SERVER_NONCE_BYTES: Final = 64

# A client's per-update nonce: 128 bits, unique per (client, round, attempt).
NONCE_BYTES: Final = 16

# Ed25519 public key.
PUBLIC_KEY_BYTES: Final = 32

# Ed25519 signature.
SIGNATURE_BYTES: Final = 64

# The version this implementation speaks, as (major, minor).
PROTOCOL_VERSION: Final = (2, 1)

# Major versions this implementation can talk to; minors within a major are compatible.
SUPPORTED_MAJOR_VERSIONS: Final = (2,)
