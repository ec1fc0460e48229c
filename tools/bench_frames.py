"""Frame codec throughput: how many DL/T 698.45 frames a second this CPU encodes and decodes.

In-process and I/O-free (the codec is sans-I/O), so the number is the codec's
own cost, the ceiling a link driver can reach on this machine. The default
APDU is 360 bytes, the size of the paper's meter packets. ``edgekey bench hal``
reports the dict; nothing here prints.
"""

from __future__ import annotations

import random
import time

from hal.dlt698 import (
    L_OVERHEAD,
    MAX_FRAME_BYTES,
    Control,
    Frame,
    FrameDecoder,
    FunctionCode,
    ServerAddress,
    encode_frame,
)
from hal.link import READ_CHUNK  # feed the decoder as the link driver does
from hal.require import require_int

PAPER_APDU_BYTES = 360  # the paper's meter packet size
SA_BYTES = 6  # a meter's address: 12 BCD digits
MB = 1_000_000  # rates are in decimal megabytes


def measure_frame_codec(frames: int = 20000, apdu_bytes: int = PAPER_APDU_BYTES) -> dict:
    """Encode then decode ``frames`` frames with ``apdu_bytes`` of APDU each; rates per second.

    Returns the parameters (frames, apdu_bytes, frame_bytes) and
    encode_frames_per_s, encode_mb_per_s, decode_frames_per_s, decode_mb_per_s.
    Raises RuntimeError if the decoder does not give back every frame: a
    benchmark of a broken codec is no benchmark.
    """
    frames = require_int("frames", frames, min=1)
    apdu_bytes = require_int("apdu_bytes", apdu_bytes, min=0,
                             max=MAX_FRAME_BYTES - 2 - L_OVERHEAD - SA_BYTES)
    # Distinct APDUs (slices of one random block) so nothing is cached by accident.
    block = random.Random(698).randbytes(apdu_bytes + 256)
    control = Control(FunctionCode.USER_DATA)
    batch = [Frame(control, ServerAddress((i % 1_000_000).to_bytes(SA_BYTES, "little")),
                   0x10, block[i % 256:i % 256 + apdu_bytes]) for i in range(frames)]

    start = time.perf_counter()
    encoded = [encode_frame(f, MAX_FRAME_BYTES) for f in batch]
    encode_s = time.perf_counter() - start

    stream = b"".join(encoded)
    decoder = FrameDecoder(MAX_FRAME_BYTES)
    decoded = 0
    start = time.perf_counter()
    for pos in range(0, len(stream), READ_CHUNK):
        decoder.receive_data(stream[pos:pos + READ_CHUNK])
        for _event in decoder.events():
            decoded += 1
    decode_s = time.perf_counter() - start
    if decoded != frames or decoder.frames != frames:
        raise RuntimeError(f"decoded {decoder.frames} frames and {decoded} events "
                           f"from {frames} encoded; rejects: {decoder.rejects}")

    encode_s = max(encode_s, 1e-9)
    decode_s = max(decode_s, 1e-9)
    return {
        "frames": frames,
        "apdu_bytes": apdu_bytes,
        "frame_bytes": len(encoded[0]),
        "encode_frames_per_s": frames / encode_s,
        "encode_mb_per_s": len(stream) / encode_s / MB,
        "decode_frames_per_s": frames / decode_s,
        "decode_mb_per_s": len(stream) / decode_s / MB,
    }
