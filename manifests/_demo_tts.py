"""Speech for the demo corpus: espeak-ng (shipped by the ``espeakng-loader`` wheel) driven via ctypes.

libespeak-ng keeps hidden state between utterances (a static pitch-flutter index in its wave
generator), so the same text and settings give slightly different samples depending on what was
spoken before in the process. To make every corpus byte-identical for a seed, a whole batch is
synthesised in a *fresh* Python process, always in the same order (:func:`synthesize_batch`).
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass

import numpy as np

SR = 16000  # corpus sample rate; espeak-ng speaks at 22050 Hz and we resample

# espeak_PARAMETER values (speak_lib.h)
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1


class TTSUnavailable(RuntimeError):
    pass


@dataclass
class Prosody:
    """espeak-ng settings: rate in words/min (80..450), volume = amplitude (0..200, 100 normal),
    pitch = base pitch (0..99, 50 normal), range = pitch range (0..99, 50 normal)."""
    rate: int = 175
    volume: int = 100
    pitch: int = 50
    range: int = 50

    def clipped(self) -> "Prosody":
        return Prosody(int(np.clip(self.rate, 80, 450)), int(np.clip(self.volume, 0, 200)),
                       int(np.clip(self.pitch, 0, 99)), int(np.clip(self.range, 0, 99)))


class _Espeak:
    """One initialised libespeak-ng (one per process: the library is a global singleton)."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise TTSUnavailable("the demo corpus needs espeak-ng: pip install espeakng-loader") from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                          espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise TTSUnavailable(f"espeak-ng failed to initialise (code {self.rate}); reinstall espeakng-loader")
        self._chunks: list[np.ndarray] = []
        cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def on_audio(wav, n, _events):
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = cb_type(on_audio)  # keep a reference: the library calls it later
        lib.espeak_SetSynthCallback(self._cb)
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib = lib

    def speak(self, text: str, voice: str, prosody: Prosody, seed: int = 0) -> np.ndarray:
        """int16 samples at ``self.rate``. ``seed`` seeds espeak-ng's random numbers (the breath
        noise of voice variants such as +f2, +f3), which are otherwise seeded from the clock."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise TTSUnavailable(f"espeak-ng has no voice {voice!r}")
        p = prosody.clipped()
        for param, value in ((_RATE, p.rate), (_VOLUME, p.volume), (_PITCH, p.pitch), (_RANGE, p.range)):
            self.lib.espeak_SetParameter(param, value, 0)
        self._chunks = []
        self.lib.espeak_ng_SetRandSeed(int(seed) % 2**31)
        raw = text.encode("utf-8")
        err = self.lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise TTSUnavailable(f"espeak-ng failed to speak {text!r} (error {err})")
        return np.concatenate(self._chunks)


def _synthesize_here(jobs: list[tuple[str, str, dict, int]]) -> list[np.ndarray]:
    from scipy.signal import resample_poly

    tts = _Espeak()
    out = []
    for text, voice, prosody, seed in jobs:
        x = tts.speak(text, voice, Prosody(**prosody), seed).astype(np.float32) / 32768.0
        g = np.gcd(SR, tts.rate)
        out.append(resample_poly(x, SR // g, tts.rate // g).astype(np.float32))
    return out


def synthesize_batch(jobs: list[tuple]) -> list[np.ndarray]:
    """Speak each (text, voice, prosody[, seed]) job (seed: see :meth:`_Espeak.speak`, default 0);
    float32 mono at 16 kHz in [-1, 1].

    Runs in a fresh Python process (``python -m manifests._demo_tts``) so the result depends only
    on ``jobs`` (see module doc); unlike a multiprocessing pool this never re-imports the caller's
    main script, so it works from any script, notebook or stdin."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    plain = [[j[0], j[1], asdict(j[2]), int(j[3]) if len(j) > 3 else 0] for j in jobs]
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="imer-tts-") as tmp:
        src, dst = Path(tmp) / "jobs.json", Path(tmp) / "speech.npz"
        src.write_text(json.dumps(plain))
        r = subprocess.run([sys.executable, "-m", "manifests._demo_tts", str(src), str(dst)],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            lines = (r.stderr or "").strip().splitlines()
            raise TTSUnavailable(lines[-1] if lines else f"espeak-ng subprocess exited with {r.returncode}")
        with np.load(dst) as z:
            return [z[f"a{i}"] for i in range(len(jobs))]


def _main(argv: list[str]) -> int:
    import json

    jobs = json.loads(open(argv[0], encoding="utf-8").read())
    speech = _synthesize_here([tuple(j) for j in jobs])
    np.savez(argv[1], **{f"a{i}": x for i, x in enumerate(speech)})
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(_main(sys.argv[1:]))
    except TTSUnavailable as e:
        print(e, file=sys.stderr)
        sys.exit(3)
