"""`ByteTokenizer`: the embedded tiny model's tokenizer — one token per UTF-8 byte, plus specials.

Ids 0..255 are the bytes, then BOS, EOS and PAD. Decoding replaces invalid UTF-8 (a completion cut
in the middle of a multi-byte character) with U+FFFD instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ByteTokenizer:
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        """Bytes of `ids` as text; special ids (BOS, EOS, PAD) are dropped."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the byte vocabulary [0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
