"""Mail passwords at rest: Fernet tokens under MAILWORKER_ENCRYPTION_KEYS.

The first key encrypts, every key decrypts (MultiFernet), so a new key goes first and the old
ones stay until `mailworker account rotate-keys` re-encrypted every password.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from mailworker.errors import PermanentError
from mailworker.settings import Settings


def cipher(settings: Settings) -> MultiFernet:
    return MultiFernet([Fernet(key.encode("ascii")) for key in settings.encryption_keys])


def encrypt_password(settings: Settings, password: str) -> str:
    return cipher(settings).encrypt(password.encode("utf-8")).decode("ascii")


def decrypt_password(settings: Settings, token: str) -> str:
    try:
        return cipher(settings).decrypt(token.encode("ascii")).decode("utf-8")
    except InvalidToken:
        raise PermanentError(
            "a stored mail password cannot be decrypted with any key in "
            "MAILWORKER_ENCRYPTION_KEYS (was a key removed before rotate-keys ran?)"
        ) from None


def rotate_token(settings: Settings, token: str) -> str:
    """The same password encrypted under the first key."""
    try:
        return cipher(settings).rotate(token.encode("ascii")).decode("ascii")
    except InvalidToken:
        raise PermanentError(
            "a stored mail password cannot be decrypted with any key in MAILWORKER_ENCRYPTION_KEYS"
        ) from None
