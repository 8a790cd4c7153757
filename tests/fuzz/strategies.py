"""Hypothesis strategies for the volume plugin protocol, right and wrong.

Paths inside the workspace are written as placeholders (@SENTINEL@, @BASE@, @ROOT@,
@WS@) that `FuzzTarget.resolve` replaces in the encoded request, since the strategies
exist before the workspace does.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

from ..protocol.conftest import ENDPOINTS_WITH_BODY

ENDPOINTS = [
    "/Plugin.Activate",
    "/VolumeDriver.Capabilities",
    "/VolumeDriver.List",
    *ENDPOINTS_WITH_BODY,
]
BAD_ENDPOINTS = [
    "/",
    "*",
    "/VolumeDriver.",
    "/VolumeDriver.Foo",
    "/volumedriver.mount",
    "/VolumeDriver.Mount/",
    "//VolumeDriver.Mount",
    "/VolumeDriver.Mount/../VolumeDriver.Remove",
    "/VolumeDriver.Remove?Name=v",
    "/VolumeDriver.Remove#x",
    "/VolumeDriver.Remove%00",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/../../etc/passwd",
    "http://plugin/VolumeDriver.Remove",
    "VolumeDriver.Remove",
    "/Plugin.Activate" + "x" * 9000,
]

# Where an escape would land: the sentinel, absolute and relative to the root, a volume
# folder and its activemounts/ folder.
PLACES = [
    "@SENTINEL@",
    "@SENTINEL@/x",
    "@SENTINEL@/new",
    "@SENTINEL@/keep.txt",
    "@SENTINEL@/v",
    "@SENTINEL@/to-root",
    "@BASE@",
    "@BASE@/",
    "@BASE@/kept.txt",
    "@BASE@/sub",
    "@BASE@/missing",
    "@ROOT@",
    "@ROOT@/v",
    "@ROOT@/v/upper",
    "@ROOT@/v/mountpoint",
    "@WS@",
    "/",
    "/etc",
    "/etc/passwd",
    "/tmp",
    "/run/docker/plugins",
    "/run/docker/plugins/docker-on-top.sock",
    "/dev/null",
    "/proc/self",
]
ESCAPES = [
    # From the root, from a volume's folder, from its activemounts/ folder, and beyond.
    "../sentinel",
    "../sentinel/x",
    "../sentinel/new",
    "../sentinel/keep.txt",
    "../../sentinel/new",
    "../../sentinel/keep.txt",
    "../../sentinel/x",
    "../../../sentinel/new",
    "../../../sentinel/keep.txt",
    "../../../sentinel/x",
    "../../../../sentinel/new",
    "../base",
    "../../base/kept.txt",
    "../../../base/kept.txt",
    "..",
    "../x",
    "../../x",
    "../w",
    "../v/activemounts/c1",
    "../../w/activemounts/c1",
    "c1/../../w",
    ".",
    "./v",
    "v/..",
    "v/../w",
    "x/../v",
    "v/",
    "/v",
    "~",
    "$HOME",
    "*",
    "-",
    "--rm",
    "a:b",
    "a,b",
    "a b",
    "\\",
    "a\\b",
    "..\\x",
]
WEIRD = [
    "",
    "\x00",
    "v\x00",
    "\x00v",
    "a\x00b",
    "c1\x00",
    "v\n",
    "\nv",
    "v\r\n",
    " v",
    "v ",
    "\t",
    "\x7f",
    "ü",
    "v\u0301",
    "\u202ev",
    "\U0001f600",
    "\ud800",
    "v\udfff",
    "\ufeffv",
    "\uff56",  # fullwidth v
    "\u0663",  # arabic-indic three
    "v" * 255,
    "v" * 256,
    "i" * 4096,
]
# `gone` exists, but its base was removed after its creation: its Mounts fail.
EXISTING_NAMES = ["v", "w", "m1", "gone"]
EXISTING_IDS = ["c1", "c2", "0" * 64]

valid_names = st.from_regex(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,16}\Z")
huge_strings = st.sampled_from([1 << 10, 1 << 16, (1 << 20) - 100, 1 << 20, 3 << 19]).map(
    lambda n: "h" * n
)
path_like = st.text(alphabet="./\\\x00vw1-:,~ ", max_size=14)
composed = st.builds(
    lambda a, b: a + b,
    st.sampled_from(PLACES + EXISTING_NAMES),
    st.sampled_from(["/", "/..", "/../x", "\x00", "/\x00", "\n", "/new", "\\", ":x", ",x"]),
)
# What a name, an ID or a base should never get through to the filesystem.
hostile = st.one_of(
    st.sampled_from(PLACES),
    st.sampled_from(ESCAPES),
    st.sampled_from(ESCAPES),
    st.sampled_from(WEIRD),
    composed,
    path_like,
    huge_strings,
)
# A name, an ID or a base: right, wrong and hostile strings.
strings = st.one_of(
    st.sampled_from(EXISTING_NAMES),
    st.sampled_from(EXISTING_IDS),
    hostile,
    hostile,
    hostile,
    valid_names,
    st.text(max_size=20),
)

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
values = st.one_of(strings, strings, strings, junk)
words = st.sampled_from(["true", "false", "yes", "no", "TRUE", "No", "1", "on", "", "\x00"])
options = st.one_of(
    st.none(),
    junk,
    st.fixed_dictionaries(
        {"base": st.one_of(st.sampled_from(PLACES), strings)},
        optional={"volatile": st.one_of(words, values)},
    ),
    st.dictionaries(
        st.one_of(st.sampled_from(["base", "volatile", "Base", "size", ""]), st.text(max_size=8)),
        st.one_of(words, values),
        max_size=4,
    ),
)
body_objects = st.fixed_dictionaries(
    {},
    optional={
        "Name": values,
        "ID": values,
        "Opts": options,
        "Pad": st.one_of(huge_strings, junk),
    },
)


def encode(document: object) -> bytes:
    # Lone surrogates and NaN included: what dockerd never sends, but a client might.
    return json.dumps(document).encode("utf-8", "surrogatepass")


deep_nesting = st.one_of(st.integers(2, 200_000), st.sampled_from([900, 1000, 3000, 100_000])).map(
    lambda n: b"[" * n + b"]" * n
)
raw_bodies = st.one_of(
    st.just(b""),
    st.sampled_from(
        [
            b"{",
            b"null",
            b"[]",
            b"42",
            b'"v"',
            b"{'Name': 'v'}",
            b'{"Name": "v",}',
            b'{"Name": "v"} trailing',
            b'{"Name": "v", "Name": "../x"}',
            b'{"Name": "w", "ID": "c2", "ID": "../../x"}',
            b'{"Name": "\\u0000"}',
            b'{"Name": "\\ud800"}',
            b'{"Name": ' + b"1" * 5000 + b"}",
            b'{"Name": "v"}\x00',
            b"\xef\xbb\xbf" + b'{"Name": "v"}',
            b'{"Name": "v\xff"}',
            b"\xff\xfe{\x00}\x00",
        ]
    ),
    deep_nesting,
    st.binary(max_size=300),
)


@st.composite
def near_valid_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request on the names and IDs in use, mostly with one field (name, ID or
    base) made hostile, sometimes more fuzz: other values, an extra key, or a duplicate
    key (the last one wins in json.loads)."""
    endpoint = draw(st.sampled_from(ENDPOINTS_WITH_BODY))
    body: dict[str, object] = {"Name": draw(st.sampled_from(EXISTING_NAMES))}
    opts: dict[str, object] = {"base": "@BASE@"}
    if endpoint in ("/VolumeDriver.Mount", "/VolumeDriver.Unmount"):
        body["ID"] = draw(st.sampled_from(EXISTING_IDS))
    if endpoint == "/VolumeDriver.Create":
        if draw(st.booleans()):
            opts["volatile"] = draw(words)
        body["Opts"] = opts
    spoil = draw(st.sampled_from(["Name", "ID", "base", "none"]))
    if spoil == "base":
        opts["base"] = draw(hostile)
    elif spoil != "none":
        body[spoil] = draw(hostile)
    for _ in range(draw(st.integers(0, 3)) // 2):
        body[draw(st.sampled_from(["Name", "ID", "Opts", "Extra"]))] = draw(values)
    raw = encode(body)
    if draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(["Name", "ID"]))
        raw = raw[:-1] + b", " + encode(key) + b": " + encode(draw(strings)) + b"}"
    return endpoint, raw


targets = st.sampled_from(ESCAPES + PLACES)


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """Valid requests but for a name, ID or base aimed at the sentinel, the base, the
    root, another volume or a system path; on the volumes that exist, mostly."""
    endpoint = draw(
        st.sampled_from([*ENDPOINTS_WITH_BODY, "/VolumeDriver.Mount", "/VolumeDriver.Unmount"])
    )
    # Branches chosen by hand: one_of's choice of branch is far from even.
    existing = draw(st.integers(0, 2)) > 0
    body: dict[str, object] = {
        "Name": draw(st.sampled_from(EXISTING_NAMES) if existing else targets)
    }
    if endpoint in ("/VolumeDriver.Mount", "/VolumeDriver.Unmount"):
        kind = draw(st.integers(0, 4))
        ids = st.sampled_from(EXISTING_IDS) if kind < 2 else targets if kind < 4 else hostile
        body["ID"] = draw(ids)
    if endpoint == "/VolumeDriver.Create":
        kind = draw(st.integers(0, 2))
        body["Opts"] = {
            "base": draw(st.just("@BASE@") if kind == 0 else targets if kind == 1 else hostile)
        }
    return endpoint, encode(body)


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """An endpoint (mostly a real one) and a body (mostly a JSON object)."""
    if draw(st.booleans()):
        return draw(near_valid_requests())
    endpoint = draw(
        st.one_of(
            st.sampled_from(ENDPOINTS_WITH_BODY),
            st.sampled_from(ENDPOINTS),
            st.sampled_from(BAD_ENDPOINTS),
        )
    )
    body = draw(
        st.one_of(
            body_objects.map(encode),
            body_objects.map(encode),
            body_objects.map(encode),
            junk.map(encode),
            raw_bodies,
        )
    )
    return endpoint, body


# Strings that are hard to pass on to the system: NULs, lone surrogates (they cannot be
# encoded to a file name), controls, and the limits of a file name and a path.
ODD = ["\x00", "a\x00b", "\x00" * 3, "\ud800", "v\udfff", "\udcff", "\x01", "\x1b[0m", "\r",
       "\u2028", "\uffff", "n" * 255, "n" * 256, "/" + "p" * 4095, "/" + "p" * 4096]  # fmt: skip
odd_strings = st.one_of(
    st.sampled_from(ODD),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(["@BASE@", "@BASE@/", "/tmp/", "v"]),
        st.sampled_from(ODD),
    ),
    st.text(max_size=12),
)


@st.composite
def odd_field_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request but for one string (name, ID, base, volatile, an option's name)
    that the daemon has to refuse, or a body that is no JSON at all."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(ENDPOINTS)), draw(raw_bodies)
    endpoint = draw(st.sampled_from(ENDPOINTS_WITH_BODY))
    fields = ["Name"]
    if endpoint in ("/VolumeDriver.Mount", "/VolumeDriver.Unmount"):
        fields.append("ID")
    if endpoint == "/VolumeDriver.Create":
        fields += ["base", "base", "volatile", "option"]
    spoil = draw(st.sampled_from(fields))
    odd = draw(odd_strings)
    body: dict[str, object] = {"Name": odd if spoil == "Name" else "w"}
    if "ID" in fields:
        body["ID"] = odd if spoil == "ID" else "c2"
    if endpoint == "/VolumeDriver.Create":
        opts = {"base": odd if spoil == "base" else "@BASE@"}
        if spoil == "volatile":
            opts["volatile"] = odd
        if spoil == "option":
            opts[odd] = "x"
        body["Opts"] = opts
    return endpoint, encode(body)


# --- HTTP framing -------------------------------------------------------------------------

METHODS = ["POST", "POST", "POST", "GET", "PUT", "post", "HEAD", "OPTIONS", "", "P\x00ST"]
VERSIONS = ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.9", "HTTP/2", "http/1.1", "HTTP/1.1 x", ""]
EOLS = [b"\r\n", b"\r\n", b"\n", b"\r", b"\n\r"]


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` in chunks, sometimes broken: bad sizes, missing CRLF or last chunk."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    out = b""
    for piece in pieces:
        size = b"%x" % len(piece)
        size = draw(
            st.sampled_from(
                [size, size, size, size + b";ext=1", b"%X" % len(piece), b"zz", b"-1",
                 b"%x" % (len(piece) + 5), b"ffffffffffffffff", b"", b" " + size]
            )
        )  # fmt: skip
        out += size + b"\r\n" + piece + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"xx"]))
    return out + draw(st.sampled_from([b"0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b""]))


@st.composite
def http_messages(draw: st.DrawFn) -> bytes:
    """One or more requests with random framing: methods, versions, header lines,
    Content-Length right, wrong, missing or huge, chunked bodies, cut anywhere."""
    messages = b""
    for _ in range(draw(st.integers(1, 3))):
        endpoint, body = draw(json_requests())
        eol = draw(st.sampled_from(EOLS))
        line = " ".join(
            [draw(st.sampled_from(METHODS)), endpoint, draw(st.sampled_from(VERSIONS))]
        ).encode("utf-8", "surrogatepass")
        headers: list[bytes] = []
        framing = draw(st.sampled_from(["length", "length", "chunked", "none", "both"]))
        if framing in ("length", "both"):
            length = draw(
                st.sampled_from(
                    [str(len(body))] * 4
                    + [str(len(body) + 1), str(max(len(body) - 1, 0)), "0", "-1", "abc", "",
                       " 5 ", "0x10", "1_0", "+3", "99999999999999999999", str(1 << 20),
                       str((1 << 20) + 1), f"{len(body)}, {len(body)}"]
                )
            )  # fmt: skip
            headers.append(b"Content-Length: " + length.encode())
        if framing in ("chunked", "both"):
            encoding = draw(st.sampled_from(["chunked", "chunked", "CHUNKED", "gzip, chunked"]))
            headers.append(b"Transfer-Encoding: " + encoding.encode())
        headers += draw(
            st.lists(
                st.sampled_from(
                    [
                        b"Host: plugin",
                        b"Accept: application/vnd.docker.plugins.v1.2+json",
                        b"Connection: close",
                        b"Connection: keep-alive",
                        b"Connection: Upgrade, HTTP2-Settings",
                        b"Expect: 100-continue",
                        b"Content-Type: application/json",
                        b"Transfer-Encoding: identity",
                        b"Content-Length: 3",
                        b"NoColonHere",
                        b": empty name",
                        b" folded continuation",
                        b"X-Nul: \x00\x00",
                        b"X-Latin: \xe9\xff",
                        b"X-Long: " + b"l" * 9000,
                    ]
                ),
                max_size=4,
            )
        )
        if draw(st.integers(0, 19)) == 0:
            headers += [b"X-Many: y"] * 120
        payload = draw(chunked(body)) if framing in ("chunked", "both") else body
        messages += line + eol + b"".join(h + eol for h in headers) + eol + payload
    if draw(st.integers(0, 3)) == 0:  # cut anywhere: half a request
        messages = messages[: draw(st.integers(0, len(messages)))]
    return messages


garbage = st.one_of(
    st.binary(min_size=1, max_size=2000),
    st.binary(min_size=1, max_size=200).map(lambda b: b"POST /VolumeDriver.Get HTTP/1.1\r\n" + b),
    st.binary(min_size=1, max_size=200).map(lambda b: b + b"\r\n\r\n"),
    st.sampled_from(
        [
            b"\r\n",
            b"\r\n\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS client hello
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"\x00" * 10_000,
            b"\n" * 10_000,
            b"A" * 70_000,
        ]
    ),
)
