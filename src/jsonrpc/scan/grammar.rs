//! JSON's grammar, walked over bytes: whitespace, strings (with a vectorized check for raw control
//! characters), numbers, literals, and nested values to 128 levels. Every read is bounds-checked and
//! every doubt is `None`; see the parent module for what serde_json accepts and why the walk follows it.

/// How many levels of arrays and objects inside a member the scanner follows (bits of a `u128`).
const MAX_DEPTH: u32 = 128;

/// A position in a message's bytes. Every read is bounds-checked: running off the end is "don't know".
pub(super) struct Walk<'a> {
    pub(super) b: &'a [u8],
    pub(super) i: usize,
}

impl<'a> Walk<'a> {
    pub(super) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Skips JSON whitespace.
    pub(super) fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// `:` between whitespace, after a key.
    pub(super) fn colon(&mut self) -> Option<()> {
        self.ws();
        if self.peek()? != b':' {
            return None;
        }
        self.i += 1;
        self.ws();
        Some(())
    }

    /// A top-level key (just past its opening quote) without escapes: its bytes.
    pub(super) fn plain_key<const VALIDATE: bool>(&mut self) -> Option<&'a [u8]> {
        let rest = &self.b[self.i..];
        let end = stop::<VALIDATE>(rest)?;
        if rest[end] != b'"' {
            return None;
        }
        self.i += end + 1;
        Some(&rest[..end])
    }

    /// A string's content and closing quote (just past its opening quote).
    fn string<const VALIDATE: bool>(&mut self) -> Option<()> {
        loop {
            let rest = &self.b[self.i..];
            let end = stop::<VALIDATE>(rest)?;
            self.i += end;
            if rest[end] == b'"' {
                self.i += 1;
                return Some(());
            }
            match rest.get(end + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                b'u' => {
                    let hex = rest.get(end + 2..end + 6)?;
                    if VALIDATE && !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.i += 6;
                }
                _ if VALIDATE => return None,
                _ => self.i += 2,
            }
        }
    }

    /// Skips ASCII digits; how many.
    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
        self.i - start
    }

    /// A number, by JSON's grammar (serde_json's `ignore_integer`, `ignore_decimal`, `ignore_exponent`).
    fn number<const VALIDATE: bool>(&mut self) -> Option<()> {
        if !VALIDATE {
            while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.b.get(self.i) {
                self.i += 1;
            }
            return Some(());
        }
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => {
                self.i += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return None; // a leading zero
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// `true`, `false` or `null`.
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + word.len())? != word {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// A key inside a value (any string), and the colon after it.
    fn inner_key<const VALIDATE: bool>(&mut self) -> Option<()> {
        if self.peek()? != b'"' {
            return None;
        }
        self.i += 1;
        self.string::<VALIDATE>()?;
        self.colon()
    }

    /// One value, starting at its first byte; ends just past its last. Arrays and objects are
    /// followed with a stack of bits (1: object), as serde_json's `ignore_value` does with its frames.
    pub(super) fn value<const VALIDATE: bool>(&mut self) -> Option<()> {
        let (mut stack, mut depth) = (0u128, 0u32);
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    self.string::<VALIDATE>()?;
                }
                open @ (b'{' | b'[') => {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    let object = open == b'{';
                    stack = stack << 1 | u128::from(object);
                    depth += 1;
                    self.i += 1;
                    self.ws();
                    let close = if object { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.i += 1;
                        stack >>= 1;
                        depth -= 1;
                    } else {
                        if object {
                            self.inner_key::<VALIDATE>()?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number::<VALIDATE>()?,
                _ => return None,
            }
            // Just past a value: close what it ends, or go on to the next one.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let object = stack & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        if object {
                            self.inner_key::<VALIDATE>()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.i += 1;
                stack >>= 1;
                depth -= 1;
            }
        }
    }
}

/// How many bytes of a string are looked at one by one before memchr2 takes over: most strings
/// (keys, names, short values) end within them, and a call of memchr2 costs more than that.
const SHORT: usize = 16;

/// The bytes that end a run of plain string content: `"`, `\` and the control characters (below
/// 0x20, which JSON forbids raw in a string).
static STOPS: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Where the first `"` or `\` in `rest` (a string's content) is. `None`: there is none, or a control
/// character comes before it (always checked in the first bytes; beyond them only when `VALIDATE`, as
/// valid text has none).
#[inline]
fn stop<const VALIDATE: bool>(rest: &[u8]) -> Option<usize> {
    let head = &rest[..rest.len().min(SHORT)];
    if let Some(end) = head.iter().position(|&b| STOPS[usize::from(b)]) {
        return (rest[end] >= 0x20).then_some(end);
    }
    let tail = rest.get(SHORT..)?;
    let end = memchr::memchr2(b'"', b'\\', tail)?;
    if VALIDATE && has_control(&tail[..end]) {
        return None;
    }
    Some(SHORT + end)
}

/// Whether `bytes` holds a control character (below 0x20), which JSON forbids raw in a string: the
/// smallest byte, found by a fold without an early exit, which LLVM vectorizes (`pminub`, 32 bytes a
/// step with SSE2).
fn has_control(bytes: &[u8]) -> bool {
    bytes.iter().fold(u8::MAX, |low, &b| low.min(b)) < 0x20
}
