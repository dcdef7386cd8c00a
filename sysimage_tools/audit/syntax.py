"""The text of one strace line: quoted strings and their escapes, argument lists, -y fd
decorations, return values. Pure functions (parser.py puts them to work)."""
from __future__ import annotations

import re

_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.S)
_SPECIAL = re.compile(r'["<,()\[\]{}/]')
_ERRNO = re.compile(r"\s*(E[A-Z0-9_]+|\(errno \d+\))")
_FDARG = re.compile(r"(AT_FDCWD|-?\d+)(<.*>)?$", re.S)
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.S)
_NAMED_ESCAPES = {b"n": 10, b"t": 9, b"r": 13, b"v": 11, b"f": 12, b"a": 7, b"b": 8, b"e": 27}


def unescape(body: str) -> str:
    """The text between strace's quotes -> the string it stands for (bytes decoded as UTF-8,
    undecodable bytes kept as surrogates, like os.fsdecode)."""
    if "\\" not in body:
        return body
    raw = _ESCAPE.sub(_unescape_one, body.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "surrogateescape")


def _unescape_one(m):
    octal, hexa, ch = m.groups()
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa is not None:
        return bytes((int(hexa, 16),))
    return bytes((_NAMED_ESCAPES[ch],)) if ch in _NAMED_ESCAPES else ch


def split_args(s: str, i: int = 0):
    """Split the argument text that starts at s[i] (just after the opening parenthesis) at top-level
    commas -> (args, index after the closing parenthesis, or None when it never closes)."""
    args, depth, start, n = [], 0, i, len(s)
    search = _SPECIAL.search
    while True:
        m = search(s, i)
        if m is None:
            break
        i = m.start()
        c = s[i]
        if c == '"':
            i = _skip_string(s, i)
            continue
        if c == "<":
            if i > 0 and (s[i - 1].isdigit() or s.endswith("AT_FDCWD", 0, i)):
                i = _skip_decoration(s, i)
                continue
        elif c == "/":
            if s.startswith("/*", i):
                j = s.find("*/", i + 2)
                i = n if j < 0 else j + 2
                continue
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                if c == ")":
                    args.append(s[start:i].strip())
                    return (args if args != [""] else []), i + 1
            else:
                depth -= 1
        elif depth == 0:                 # ","
            args.append(s[start:i].strip())
            start = i + 1
        i += 1
    tail = s[start:].strip()
    if tail:
        args.append(tail)
    return args, None


def _skip_string(s, i):
    """s[i] == '"': the index after the closing quote (and after a truncation mark "...")."""
    m = _STRING_REST.match(s, i + 1)
    if m is None:
        return len(s)
    i = m.end()
    return i + 3 if s.startswith("...", i) else i


def _skip_decoration(s, i):
    """s[i] == "<": the index after the matching ">" (-yy nests: 1</dev/null<char 1:3>>)."""
    depth, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def string_arg(arg: str):
    """A quoted argument -> (text, truncated); None for NULL, addresses, numbers, flags."""
    if not arg.startswith('"'):
        return None
    end = _skip_string(arg, 0)
    truncated = arg.startswith("...", end - 3) and end - 3 > 0 and arg[end - 4] == '"'
    body = arg[1:end - 4] if truncated else arg[1:end - 1]
    return unescape(body), truncated


def _decoration_path(deco: str):
    """"</path>" (with -yy extras and " (deleted)") -> "/path"; None when it is not a path."""
    inner = deco[1:-1]
    if inner.endswith(">"):              # -yy: </dev/pts/0<char 136:0>>
        k = inner.rfind("<")
        if k > 0:
            inner = inner[:k]
    inner = unescape(inner)
    if inner.endswith(" (deleted)"):
        inner = inner[:-10]
    return inner if inner.startswith("/") else None


def fd_arg(arg: str):
    """An fd argument -> (fd number or "AT_FDCWD", decorated path or None); None if it is not an fd."""
    m = _FDARG.match(arg)
    if not m:
        return None
    fd = m.group(1) if m.group(1) == "AT_FDCWD" else int(m.group(1))
    if fd == -100:                       # AT_FDCWD printed as a number (-X raw)
        fd = "AT_FDCWD"
    return fd, (_decoration_path(m.group(2)) if m.group(2) else None)


def result_of(s: str, i: int):
    """The text after the closing parenthesis -> (return token, its -y path, errno name)."""
    n = len(s)
    while i < n and s[i] == " ":
        i += 1
    if i >= n or s[i] != "=":
        return None, None, None
    i += 1
    while i < n and s[i] == " ":
        i += 1
    j = i
    while j < n and s[j] not in " <":
        j += 1
    ret = s[i:j]
    if not ret:
        return None, None, None
    deco = None
    if j < n and s[j] == "<":
        k = _skip_decoration(s, j)
        deco = _decoration_path(s[j:k])
        j = k
    m = _ERRNO.match(s, j)
    errno = None
    if m and (ret.startswith("-") or ret == "?"):
        errno = m.group(1)
        if errno.startswith("(errno "):
            errno = "E" + errno[7:-1]     # unknown to strace: E512
    return ret, deco, errno
