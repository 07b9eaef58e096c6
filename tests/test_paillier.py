"""Paillier secure summation: exact sums, refusals, phe interoperation, key files, no leaks.

Most tests use 1024-bit keys (through allow_insecure) so the file runs in seconds; one test
uses a real 2048-bit key from `flame keys generate`.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier
from phe import util as phe_util
from phe.paillier import EncryptedNumber, PaillierPrivateKey, PaillierPublicKey

from flame.cli.keys import keys_cli
from flame.protocols.paillier import (
    AggregationOverflowError,
    ContributorCountError,
    EncryptedVector,
    Encryptor,
    InsecureKeyError,
    KeyFileError,
    KeyMismatchError,
    SecureAggregationError,
    SecureSumSpec,
    SpecMismatchError,
    SumMismatchError,
    ValueOutOfBoundsError,
    WireFormatError,
    _math,
    decrypt_fixed_point,
    decrypt_raw,
    decrypt_vector,
    encode_fixed_point,
    encrypt_vector,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    pool,
    shutdown_workers,
    verify_reported_sum,
    wire,
    write_keypair,
)
from flame.protocols.paillier.encoding import SlotLayout

BITS = 1024
SPEC = SecureSumSpec(precision=16, bound=1000.0, max_nodes=8)

KeyPair = tuple[PaillierPublicKey, PaillierPrivateKey]


@pytest.fixture(scope="module")
def keys() -> KeyPair:
    return generate_keypair(BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def other_keys() -> KeyPair:
    return generate_keypair(BITS, allow_insecure=True)


@pytest.fixture(scope="module")
def phe_keys() -> KeyPair:
    pub, priv = paillier.generate_paillier_keypair(n_length=BITS)
    return pub, priv


@pytest.fixture(scope="module")
def encryptor(keys: KeyPair) -> Encryptor:
    return Encryptor(keys[1], workers=1)


def secret_strings(priv: PaillierPrivateKey) -> list[str]:
    """Every textual form of p and q a leak could take."""
    out = []
    for x in (int(priv.p), int(priv.q)):
        raw = x.to_bytes((x.bit_length() + 7) // 8, "big")
        out += [str(x), hex(x)[2:], format(x, "X"), base64.urlsafe_b64encode(raw).decode()[:40]]
        out.append(str(x)[:30])
    return out


def assert_no_secret(text: str, priv: PaillierPrivateKey) -> None:
    for s in secret_strings(priv):
        assert s not in text


# --------------------------------------------------------------------------- exact sums

SPECS = [
    SPEC,
    SecureSumSpec(precision=0, bound=1, max_nodes=3),
    SecureSumSpec(precision=8, bound=0.5, max_nodes=1),
    # 64-bit slots whose sum needs more than int64: the exact Python-int path
    SecureSumSpec(precision=31, bound=2.0**30, max_nodes=2),
    # slots wider than 8 bytes
    SecureSumSpec(precision=40, bound=2.0**20, max_nodes=5),
]


@st.composite
def contributions(draw: Any) -> tuple[SecureSumSpec, list[list[float]]]:
    spec = draw(st.sampled_from(SPECS))
    bound = float(spec.bound)
    length = draw(st.integers(1, 120))
    k = draw(st.integers(1, spec.max_nodes))
    value = st.one_of(
        st.sampled_from([bound, -bound, 0.0, -0.0]),
        st.floats(-bound, bound, allow_nan=False, allow_infinity=False),
    )
    return spec, [draw(st.lists(value, min_size=length, max_size=length)) for _ in range(k)]


@settings(max_examples=100, deadline=None)
@given(case=contributions())
def test_decrypted_sum_is_the_exact_fixed_point_sum(
    keys: KeyPair, encryptor: Encryptor, case: tuple[SecureSumSpec, list[list[float]]]
) -> None:
    spec, nodes = case
    _, priv = keys
    vectors = [encryptor.encrypt(np.array(v), spec, field="w") for v in nodes]
    total = EncryptedVector.sum(vectors)
    assert total.contributors == len(nodes)

    exact = [
        sum(int(x) for x in col)
        for col in zip(*(encode_fixed_point(v, spec) for v in nodes), strict=True)
    ]
    k = len(nodes)
    assert decrypt_fixed_point(total, priv, spec, min_contributors=k, workers=1) == exact

    floats = decrypt_vector(total, priv, spec, min_contributors=k, workers=1)
    assert floats.dtype == np.float64 and floats.shape == (len(nodes[0]),)
    for got, col in zip(floats, zip(*nodes, strict=True), strict=True):
        want = math.fsum(col)
        assert abs(got - want) <= spec.max_error(k) + abs(want) * 2.0**-52


def test_sum_survives_the_wire(keys: KeyPair, encryptor: Encryptor) -> None:
    pub, priv = keys
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-1000, 1000, size=(7, 13)) for _ in range(5)]
    received = [EncryptedVector.from_bytes(encryptor.encrypt(x, SPEC).to_bytes(), pub) for x in xs]
    summed: EncryptedVector = sum(received)  # type: ignore[assignment]  # builtin sum works too
    total = EncryptedVector.from_bytes(summed.to_bytes(), pub)
    got = decrypt_vector(total, priv, SPEC, min_contributors=5)
    assert got.shape == (7, 13)
    np.testing.assert_allclose(got, sum(xs), rtol=0, atol=SPEC.max_error(5))


@pytest.mark.parametrize(
    ("values", "shape"),
    [
        (3.25, ()),
        ([1, -2, 3], (3,)),
        (np.arange(12, dtype=np.int32).reshape(3, 4), (3, 4)),
        (np.array([True, False]), (2,)),
        (np.zeros((0,)), (0,)),
        (np.float32(-0.5), ()),
    ],
)
def test_shapes_and_dtypes(keys: KeyPair, values: Any, shape: tuple[int, ...]) -> None:
    pub, priv = keys
    enc = encrypt_vector(values, priv, SPEC, field="x")  # all cores allowed ...
    assert not pool._PROCESS_POOLS  # ... but a small input starts no worker processes
    enc = EncryptedVector.from_bytes(enc.to_bytes(), pub)
    out = decrypt_vector(enc, priv, SPEC, min_contributors=1)
    assert out.dtype == np.float64 and out.shape == shape
    np.testing.assert_array_equal(out, np.asarray(values, dtype=np.float64))


def test_wire_size_per_value_at_2048_bits_layout(keys: KeyPair) -> None:
    spec = SecureSumSpec(precision=16, bound=32768.0, max_nodes=100)
    layout = SlotLayout.build(16, spec.max_abs_encoded, 100, 2048)
    assert layout.slot_bytes == 5 and layout.slots_per_ciphertext == 51
    assert 512 / layout.slots_per_ciphertext < 20


# --------------------------------------------------------------------------- refusals


def test_more_nodes_than_declared_is_refused(keys: KeyPair, encryptor: Encryptor) -> None:
    spec = SecureSumSpec(precision=0, bound=1, max_nodes=3)
    vs = [encryptor.encrypt([1, -1, 0], spec) for _ in range(4)]
    three = vs[0] + vs[1] + vs[2]
    assert three.contributors == 3
    with pytest.raises(ContributorCountError, match="exceeds max_nodes=3"):
        three + vs[3]
    with pytest.raises(ContributorCountError):
        EncryptedVector.sum(vs)
    with pytest.raises(ContributorCountError):
        sum(vs)
    # the header cannot claim more either
    data = bytearray(three.to_bytes())
    struct.pack_into(">I", data, 22, 4)  # contributors field
    with pytest.raises(WireFormatError, match="contributor count 4"):
        EncryptedVector.from_bytes(bytes(data), keys[0])


def test_too_few_contributors_are_refused(keys: KeyPair, encryptor: Encryptor) -> None:
    _, priv = keys
    one = encryptor.encrypt([1.0, 2.0], SPEC)
    with pytest.raises(ContributorCountError, match="at least 2"):
        decrypt_vector(one, priv, SPEC, min_contributors=2)
    two = one + encryptor.encrypt([1.0, 2.0], SPEC)
    np.testing.assert_array_equal(decrypt_vector(two, priv, SPEC, min_contributors=2), [2, 4])


class _NoEncryption(Encryptor):
    def _encrypt_ints(self, plaintexts: Any) -> Any:
        raise AssertionError("encrypted despite a bad value")


@pytest.mark.parametrize(
    ("values", "where", "why"),
    [
        ([1.0, 1000.5, 2.0], r"grad\[1\]", "outside the declared bound"),
        ([1.0, -1000.0001], r"grad\[1\]", "outside the declared bound"),
        ([0.0, 0.0, math.nan], r"grad\[2\]", "NaN"),
        ([math.inf], r"grad\[0\]", "infinite"),
        ([-math.inf, 5.0], r"grad\[0\]", "infinite"),
        (np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5e9]]), r"grad\[1, 2\]", "outside"),
        (1e308 * 10, "grad", "infinite"),
    ],
)
def test_bad_values_are_refused_before_encryption(
    keys: KeyPair, values: Any, where: str, why: str
) -> None:
    enc = _NoEncryption(keys[1], workers=1)
    with pytest.raises(ValueOutOfBoundsError, match=f"{where} .*{why}") as info:
        enc.encrypt(values, SPEC, field="grad")
    assert info.value.field == "grad"
    assert isinstance(info.value, ValueError)


def test_values_exactly_at_the_bound_are_accepted(keys: KeyPair, encryptor: Encryptor) -> None:
    enc = encryptor.encrypt([1000.0, -1000.0], SPEC)
    out = decrypt_vector(enc, keys[1], SPEC, min_contributors=1)
    np.testing.assert_array_equal(out, [1000.0, -1000.0])


def test_non_numeric_input_is_refused(encryptor: Encryptor) -> None:
    with pytest.raises(SecureAggregationError, match="w: expected"):
        encryptor.encrypt(["a", "b"], SPEC, field="w")
    with pytest.raises(SecureAggregationError):
        encryptor.encrypt([1 + 2j], SPEC, field="w")


def _forge(data: bytes, index: int, value: int, width: int, n_dims: int = 1) -> bytes:
    start = wire._HEADER.size + 8 * n_dims + index * width
    return data[:start] + value.to_bytes(width, "big") + data[start + width :]


@pytest.mark.parametrize("kind", ["zero", "nsquare", "max", "n", "p_multiple"])
def test_forged_ciphertexts_are_refused(keys: KeyPair, encryptor: Encryptor, kind: str) -> None:
    pub, priv = keys
    vec = encryptor.encrypt(np.ones(100), SPEC)
    data = vec.to_bytes()
    n, nsq = int(pub.n), int(pub.nsquare)
    width = (nsq.bit_length() + 7) // 8
    value = {
        "zero": 0,
        "nsquare": nsq,
        "max": (1 << (8 * width)) - 1,
        "n": n,
        "p_multiple": int(priv.p) * 12345,
    }[kind]
    with pytest.raises(WireFormatError, match=f"ciphertext 1 of {len(vec.ciphertexts)}") as info:
        EncryptedVector.from_bytes(_forge(data, 1, value, width), pub)
    assert_no_secret(str(info.value), priv)


def test_ciphertext_under_another_key_is_refused(
    keys: KeyPair, other_keys: KeyPair, encryptor: Encryptor
) -> None:
    pub, _ = keys
    other_pub, other_priv = other_keys
    vec = encryptor.encrypt(np.ones(60), SPEC)
    with pytest.raises(KeyMismatchError, match=key_id(pub)):
        EncryptedVector.from_bytes(vec.to_bytes(), other_pub)
    theirs = encrypt_vector(np.ones(60), other_pub, SPEC, workers=1)
    with pytest.raises(KeyMismatchError):
        vec + theirs
    with pytest.raises(KeyMismatchError):
        decrypt_vector(vec, other_priv, SPEC, min_contributors=1)
    # a forged key id does not help: the ciphertexts do not decrypt to anything valid
    data = bytearray(vec.to_bytes())
    data[6:14] = bytes.fromhex(key_id(other_pub))
    with pytest.raises((WireFormatError, AggregationOverflowError)):
        forged = EncryptedVector.from_bytes(bytes(data), other_pub)
        decrypt_vector(forged, other_priv, SPEC, min_contributors=1)


def _patched(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_malformed_wire_bytes_are_refused(keys: KeyPair, encryptor: Encryptor) -> None:
    pub, _ = keys
    data = encryptor.encrypt(np.ones(100), SPEC).to_bytes()
    cases = {
        "truncated: 10 bytes": data[:10],
        "bad magic": b"XXXX" + data[4:],
        "version 9": _patched(data, ">B", 4, 9),
        "flags": _patched(data, ">B", 5, 1),
        "slot layout in the header is inconsistent": _patched(data, ">B", 15, 7),
        "cannot hold 100 values": _patched(data, ">I", 42, 9),
        "does not hold 101 values": _patched(data, ">Q", 34, 101),
        "ciphertext width": _patched(data, ">H", 46, 100),
        "too many dimensions": _patched(data, ">B", 48, 200),
        "contributor count 0": _patched(data, ">I", 22, 0),
        "truncated:": data[:-1],
        "has trailing bytes": data + b"\x00",
        "slot layout parameters out of range": _patched(data, ">Q", 26, 0),
    }
    n_ct = SPEC.layout(pub).ciphertexts_for(100)
    assert len(data) == wire._HEADER.size + 8 + n_ct * ((int(pub.nsquare).bit_length() + 7) // 8)
    for why, blob in cases.items():
        with pytest.raises(WireFormatError, match=why.split(":")[0]):
            EncryptedVector.from_bytes(blob, pub)


def test_out_of_range_slots_are_detected_at_decryption(keys: KeyPair, encryptor: Encryptor) -> None:
    pub, priv = keys
    layout = SPEC.layout(pub)
    width = layout.slot_bytes * 8
    slots = layout.slots_per_ciphertext
    honest_max = 2 * layout.max_abs  # one contributor

    def vector_with(plaintext: int, n_values: int = slots) -> EncryptedVector:
        (c,) = encryptor.encrypt_raw([plaintext])
        return EncryptedVector(pub, layout, (n_values,), 1, [gmpy2.mpz(c)])

    ok = sum(layout.max_abs << (width * i) for i in range(slots))  # all zeros, biased
    np.testing.assert_array_equal(
        decrypt_vector(vector_with(ok), priv, SPEC, min_contributors=1), np.zeros(slots)
    )
    too_big_slot = ok + ((honest_max + 1 - layout.max_abs) << (width * 3))
    with pytest.raises(AggregationOverflowError, match="outside the range"):
        decrypt_vector(vector_with(too_big_slot), priv, SPEC, min_contributors=1)
    with pytest.raises(AggregationOverflowError, match="padding slot"):
        decrypt_vector(vector_with(ok, n_values=slots - 1), priv, SPEC, min_contributors=1)
    wider = ok + (1 << (width * slots))
    with pytest.raises(AggregationOverflowError, match="wider than"):
        decrypt_vector(vector_with(wider), priv, SPEC, min_contributors=1)


def test_mismatched_specs_and_shapes_are_refused(keys: KeyPair, encryptor: Encryptor) -> None:
    _, priv = keys
    other = SecureSumSpec(precision=8, bound=1000.0, max_nodes=8)
    a = encryptor.encrypt(np.ones(4), SPEC)
    with pytest.raises(SpecMismatchError):
        a + encryptor.encrypt(np.ones(4), other)
    with pytest.raises(SpecMismatchError, match="shape"):
        a + encryptor.encrypt(np.ones((2, 2)), SPEC)
    with pytest.raises(SpecMismatchError):
        decrypt_vector(a, priv, other, min_contributors=1)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"precision": -1, "bound": 1.0, "max_nodes": 2}, "precision"),
        ({"precision": 16, "bound": math.nan, "max_nodes": 2}, "bound"),
        ({"precision": 16, "bound": 0.0, "max_nodes": 2}, "bound"),
        ({"precision": 16, "bound": 1.0, "max_nodes": 0}, "max_nodes"),
        ({"precision": 60, "bound": 1e6, "max_nodes": 2}, "2\\*\\*62"),
        ({"precision": 1.5, "bound": 1.0, "max_nodes": 2}, "precision"),
    ],
)
def test_spec_validation(kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(SecureAggregationError, match=why):
        SecureSumSpec(**kwargs)


def test_reported_sums_are_verified(keys: KeyPair, encryptor: Encryptor) -> None:
    pub, priv = keys
    slots = SPEC.layout(pub).slots_per_ciphertext
    x = np.random.default_rng(4).uniform(-1000, 1000, (5 * slots + 3,))
    total = encryptor.encrypt(x, SPEC) + encryptor.encrypt(-x / 2, SPEC)
    honest = decrypt_vector(total, priv, SPEC, min_contributors=2)
    assert verify_reported_sum(total, priv, SPEC, honest, min_contributors=2) == 6
    assert verify_reported_sum(total, priv, SPEC, honest, min_contributors=2, fraction=0.3) == 2
    lie = honest.copy()
    lie[5 * slots + 1] += 2.0**-16  # one value, in the last (partly filled) ciphertext
    with pytest.raises(SumMismatchError, match="ciphertext 5"):
        verify_reported_sum(total, priv, SPEC, lie, min_contributors=2)
    with pytest.raises(SumMismatchError, match="shape"):
        verify_reported_sum(total, priv, SPEC, honest[:-1], min_contributors=2)
    with pytest.raises(ContributorCountError):
        verify_reported_sum(total, priv, SPEC, honest, min_contributors=3)
    caught = 0
    for _ in range(20):
        try:
            verify_reported_sum(total, priv, SPEC, lie, min_contributors=2, fraction=0.5)
        except SumMismatchError:
            caught += 1
    assert 0 < caught < 20  # a sample finds the lie about half of the time


# --------------------------------------------------------------------------- encryption paths


def test_public_key_only_and_djn_paths(keys: KeyPair) -> None:
    pub, priv = keys
    x = np.linspace(-999, 999, 150)
    plain = Encryptor(pub, workers=1)
    djn = Encryptor(pub, obfuscation="djn", workers=1)
    assert plain.method == "plain" and djn.method == "djn"
    total = plain.encrypt(x, SPEC) + djn.encrypt(x, SPEC) + encrypt_vector(x, priv, SPEC)
    np.testing.assert_allclose(
        decrypt_vector(total, priv, SPEC, min_contributors=3), 3 * x, atol=SPEC.max_error(3)
    )
    (c,) = djn.encrypt_raw([424242])
    assert priv.raw_decrypt(c) == 424242


def test_keys_from_phe_use_plain_crt(phe_keys: KeyPair, caplog: pytest.LogCaptureFixture) -> None:
    _, priv = phe_keys
    enc = Encryptor(priv, workers=1)
    structured = all(_math.factor_p_minus_1(x) is not None for x in (priv.p, priv.q))
    if structured:  # about 1 phe key in 1000 happens to have flame's prime structure
        pytest.skip("this phe key happens to be factorable")
    with caplog.at_level(logging.INFO, logger="flame.protocols"):
        assert enc.method == "crt"
    assert "not generated by flame" in caplog.text
    x = np.array([-1.5, 2.25, 999.0])
    out = decrypt_vector(enc.encrypt(x, SPEC), priv, SPEC, min_contributors=1)
    np.testing.assert_array_equal(out, x)


def test_precomputed_obfuscators_are_used_once(keys: KeyPair) -> None:
    _, priv = keys
    enc = Encryptor(priv, workers=1)
    enc.precompute(5)
    assert enc.precomputed == 5
    v = enc.encrypt(np.ones(3 * SPEC.layout(keys[0]).slots_per_ciphertext), SPEC)
    assert enc.precomputed == 2
    assert len(set(v.ciphertexts)) == 3
    w = enc.encrypt(np.ones(3 * SPEC.layout(keys[0]).slots_per_ciphertext), SPEC)
    assert enc.precomputed == 0
    assert not set(v.ciphertexts) & set(w.ciphertexts)
    out = decrypt_vector(v + w, priv, SPEC, min_contributors=2)
    assert (out == 2).all()


@pytest.fixture()
def worker_pool() -> Iterator[None]:
    yield
    shutdown_workers()


def test_worker_processes(keys: KeyPair, worker_pool: None) -> None:
    pub, priv = keys
    x = np.random.default_rng(2).uniform(-1000, 1000, 40 * SPEC.layout(pub).slots_per_ciphertext)
    fast = Encryptor(priv, workers=2, parallel_threshold=8)
    djn = Encryptor(pub, obfuscation="djn", workers=2, parallel_threshold=8)
    threads = Encryptor(pub, workers=2, parallel_threshold=8)
    total = fast.encrypt(x, SPEC) + djn.encrypt(x, SPEC) + threads.encrypt(x, SPEC)
    assert 2 in pool._PROCESS_POOLS  # the fixed-base paths really went through processes
    out = decrypt_vector(total, priv, SPEC, min_contributors=3, workers=2)
    np.testing.assert_allclose(out, 3 * x, atol=SPEC.max_error(3))


# --------------------------------------------------------------------------- phe interop


def test_phe_ciphertexts_decrypt_with_flame_loaded_keys(tmp_path: Path) -> None:
    pub_path, priv_path = write_keypair(tmp_path, BITS, allow_insecure=True)
    pub = load_public_key(pub_path, allow_insecure=True)
    priv = load_private_key(priv_path, allow_insecure=True)
    for value in (42, -7, 3.5):
        number = pub.encrypt(value)  # phe's own encryption and encoding
        (raw,) = decrypt_raw(priv, [number.ciphertext()])
        assert paillier.EncodedNumber(pub, raw, number.exponent).decode() == value
        assert priv.decrypt(number) == value


def test_flame_ciphertexts_decrypt_with_phe(keys: KeyPair, encryptor: Encryptor) -> None:
    pub, priv = keys
    (c,) = encryptor.encrypt_raw([123456789])
    assert priv.raw_decrypt(c) == 123456789
    assert priv.decrypt(EncryptedNumber(pub, c, 0)) == 123456789
    # phe arithmetic on a flame ciphertext
    assert priv.decrypt(EncryptedNumber(pub, c, 0) + 1) == 123456790
    # a packed ciphertext is a valid phe ciphertext of the packed integer
    vec = encryptor.encrypt([1.0, -2.0], SPEC)
    assert priv.raw_decrypt(int(vec.ciphertexts[0])) == decrypt_raw(priv, [vec.ciphertexts[0]])[0]


def test_flame_key_files_are_phe_jwk(tmp_path: Path) -> None:
    command_line = pytest.importorskip("phe.command_line")
    pub_path, priv_path = write_keypair(tmp_path, BITS, allow_insecure=True)
    pub_doc = json.loads(pub_path.read_text())
    assert pub_doc["kty"] == "DAJ" and pub_doc["alg"] == "PAI-GN1"
    assert pub_doc["key_ops"] == ["encrypt"]
    phe_pub = command_line.load_public_key(pub_doc)
    priv_doc = json.loads(priv_path.read_text())
    assert priv_doc["key_ops"] == ["decrypt"] and priv_doc["pub"] == pub_doc
    phe_priv = PaillierPrivateKey(
        phe_pub,
        phe_util.base64_to_int(priv_doc["p"]),
        phe_util.base64_to_int(priv_doc["q"]),
    )
    ours = load_private_key(priv_path, allow_insecure=True)
    assert phe_priv == ours and phe_pub == ours.public_key


def test_pheutil_key_files_load_in_flame(tmp_path: Path) -> None:
    pytest.importorskip("click")
    from click.testing import CliRunner
    from phe.command_line import cli

    runner = CliRunner()
    priv_path, pub_path = tmp_path / "priv.json", tmp_path / "pub.json"
    result = runner.invoke(cli, ["genpkey", "--keysize", str(BITS), str(priv_path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["extract", str(priv_path), str(pub_path)])
    assert result.exit_code == 0, result.output
    if stat.S_IMODE(priv_path.stat().st_mode) & 0o077:  # pheutil keeps the umask's mode
        with pytest.raises(KeyFileError, match="chmod 600"):
            load_private_key(priv_path, allow_insecure=True)
        priv_path.chmod(0o600)
    priv = load_private_key(priv_path, allow_insecure=True)
    assert load_public_key(pub_path, allow_insecure=True) == priv.public_key


# --------------------------------------------------------------------------- key files


def test_key_files_round_trip(tmp_path: Path) -> None:
    pub_path, priv_path = write_keypair(tmp_path / "keys", BITS, allow_insecure=True)
    assert (pub_path.name, priv_path.name) == ("public_key.json", "private_key.json")
    assert stat.S_IMODE(priv_path.stat().st_mode) == 0o600
    priv = load_private_key(priv_path, allow_insecure=True)
    pub = load_public_key(pub_path, allow_insecure=True)
    assert priv.public_key == pub
    assert json.loads(pub_path.read_text())["kid"] == key_id(pub)
    with pytest.raises(KeyFileError, match="already exists"):
        write_keypair(tmp_path / "keys", BITS, allow_insecure=True)
    write_keypair(tmp_path / "keys", BITS, allow_insecure=True, overwrite=True)
    assert load_public_key(pub_path, allow_insecure=True) != pub


def test_small_keys_need_the_insecure_flag(tmp_path: Path) -> None:
    with pytest.raises(InsecureKeyError, match="2048"):
        generate_keypair(1024)
    pub_path, priv_path = write_keypair(tmp_path, BITS, allow_insecure=True)
    with pytest.raises(InsecureKeyError, match=str(pub_path)):
        load_public_key(pub_path)
    with pytest.raises(InsecureKeyError):
        load_private_key(priv_path)


def _b64(x: int) -> str:
    return (
        base64.urlsafe_b64encode(x.to_bytes((x.bit_length() + 7) // 8, "big")).decode().rstrip("=")
    )


def test_malformed_key_files_name_the_file_and_hide_the_key(tmp_path: Path) -> None:
    _, priv_path = write_keypair(tmp_path, BITS, allow_insecure=True)
    priv = load_private_key(priv_path, allow_insecure=True)
    good = json.loads(priv_path.read_text())
    p, q, n = int(priv.p), int(priv.q), int(priv.public_key.n)

    def variant(**changes: Any) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(json.dumps(good))
        for k, v in changes.items():
            if v is None:
                doc.pop(k, None)
            else:
                doc[k] = v
        return doc

    private_cases: dict[str, Any] = {
        "not valid JSON": '{"kty": "DAJ", "p": "' + _b64(p),
        "expected a JSON object": [_b64(p)],
        "kty must be": variant(kty="RSA"),
        "missing key_ops": variant(key_ops=None),
        "lacks 'decrypt'": variant(key_ops=["encrypt"]),
        "missing 'pub'": variant(pub=None),
        "'p' must be": variant(p=None),
        "'q' is not valid base64url": variant(q=_b64(q)[:-3] + "!!!"),
        "do not match": variant(p=_b64(p + 2)),
        "not primes": variant(
            p=_b64(p * q),
            q=_b64(1),
        ),
    }
    for i, (why, doc) in enumerate(private_cases.items()):
        path = tmp_path / f"bad_private_{i}.json"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(KeyFileError) as info:
            load_private_key(path, allow_insecure=True)
        message = str(info.value)
        assert path.name in message, message
        assert why.split(":")[0] in message or (why == "not primes"), message
        assert_no_secret(message, priv)
        assert str(n)[:30] not in message

    (tmp_path / "public_bad.json").write_text(json.dumps({"kty": "DAJ", "key_ops": ["encrypt"]}))
    with pytest.raises(KeyFileError, match=r"public_bad\.json.*'n'"):
        load_public_key(tmp_path / "public_bad.json", allow_insecure=True)
    with pytest.raises(KeyFileError, match="private key where a public key was expected") as info:
        load_public_key(priv_path, allow_insecure=True)
    assert_no_secret(str(info.value), priv)
    with pytest.raises(KeyFileError, match=r"cannot read public key file .*missing\.json"):
        load_public_key(tmp_path / "missing.json")


def test_world_readable_private_key_is_refused(tmp_path: Path) -> None:
    _, priv_path = write_keypair(tmp_path, BITS, allow_insecure=True)
    for mode in (0o644, 0o640, 0o604):
        os.chmod(priv_path, mode)
        with pytest.raises(KeyFileError, match=r"accessible to other users.*chmod 600") as info:
            load_private_key(priv_path, allow_insecure=True)
        assert f"{mode:04o}" in str(info.value)
    os.chmod(priv_path, 0o600)
    assert load_private_key(priv_path, allow_insecure=True) is not None


def test_keys_cli_and_a_2048_bit_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_cli(["generate", "--bits", "2048", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    pub_path, priv_path = tmp_path / "public_key.json", tmp_path / "private_key.json"
    assert str(pub_path) in out and str(priv_path) in out
    pub, priv = load_public_key(pub_path), load_private_key(priv_path)
    assert_no_secret(out, priv)
    assert int(pub.n).bit_length() == 2048

    spec = SecureSumSpec(precision=16, bound=32768.0, max_nodes=100)
    x = np.random.default_rng(3).uniform(-32768, 32768, 300)
    vs = [
        EncryptedVector.from_bytes(encrypt_vector(x, priv, spec).to_bytes(), pub) for _ in range(3)
    ]
    total = EncryptedVector.sum(vs)
    assert len(total.to_bytes()) / x.size < 20
    np.testing.assert_allclose(
        decrypt_vector(total, priv, spec, min_contributors=3), 3 * x, atol=spec.max_error(3)
    )

    assert keys_cli(["generate", "--bits", "2048", "--out", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert keys_cli(["generate", "--bits", "1024", "--out", str(tmp_path / "x")]) == 2
    assert "too small" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert keys_cli(["generate", "--out", str(blocker / "sub")]) == 1
    assert "cannot write the key pair" in capsys.readouterr().err
    assert keys_cli(["info", str(priv_path)]) == 0
    info = capsys.readouterr().out
    assert key_id(pub) in info and "2048 bits" in info
    assert_no_secret(info, priv)
    assert keys_cli(["bogus"]) == 2


# --------------------------------------------------------------------------- no leaks


def test_no_private_key_material_in_logs(
    tmp_path: Path, phe_keys: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pub_path, priv_path = write_keypair(tmp_path, BITS, allow_insecure=True)
    os.chmod(priv_path, 0o640)
    with pytest.raises(KeyFileError) as refused:
        load_private_key(priv_path, allow_insecure=True)
    os.chmod(priv_path, 0o600)
    priv = load_private_key(priv_path, allow_insecure=True)
    assert_no_secret(str(refused.value), priv)
    pub = load_public_key(pub_path, allow_insecure=True)
    spec = SecureSumSpec(precision=10, bound=10.0, max_nodes=4)
    total = encrypt_vector(np.ones(50), priv, spec) + encrypt_vector(np.ones(50), pub, spec)
    decrypt_vector(total, priv, spec, min_contributors=2)
    Encryptor(phe_keys[1], workers=1).encrypt([1.0], spec)
    for bad in ([math.nan], [11.0]):
        with pytest.raises(ValueOutOfBoundsError):
            encrypt_vector(bad, priv, spec)
    assert caplog.records, "expected some log records"
    for record in caplog.records:
        text = record.getMessage() + " " + repr(record.args)
        assert_no_secret(text, priv)
        assert_no_secret(text, phe_keys[1])
    assert_no_secret(repr(Encryptor(priv)) + repr(total), priv)
