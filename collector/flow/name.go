package flow

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// SafeName returns a name chosen by a tenant (an interface, a namespace) in
// a form that is valid UTF-8 and free of control characters, for metric
// labels and terminals. Names that need nothing (every name in practice)
// are returned as they are. Otherwise each byte that is not valid UTF-8 and
// each control character becomes \xNN, each bidirectional-override or
// invisible formatting character \u{NNNN}, and a backslash \\: the mapping
// is one-to-one, so two different names never share a label value, and
// what the terminal shows is what the name holds, not what it would do.
func SafeName(s string) string {
	if !needsEscape(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\\':
			b.WriteString(`\\`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r >= 0x80 && r <= 0x9f, isFormatControl(r):
			fmt.Fprintf(&b, `\u{%04x}`, r)
		default:
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

func needsEscape(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c == 0x7f || c == '\\' || c >= 0x80 {
			// Non-ASCII: decide on the runes (rare; names are ASCII).
			if c >= 0x80 {
				return needsEscapeRunes(s[i:])
			}
			return true
		}
	}
	return false
}

func needsEscapeRunes(s string) bool {
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && n <= 1) || r < 0x20 || r == 0x7f || r == '\\' ||
			(r >= 0x80 && r <= 0x9f) || isFormatControl(r) {
			return true
		}
		i += n
	}
	return false
}

// isFormatControl reports the characters that change how a terminal lays
// out or orders text without showing anything: bidirectional overrides and
// isolates, zero-width characters, the byte-order mark.
func isFormatControl(r rune) bool {
	switch {
	case r >= 0x200b && r <= 0x200f, r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069, r == 0xfeff, r == 0x061c:
		return true
	}
	return false
}
