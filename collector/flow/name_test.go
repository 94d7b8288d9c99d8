package flow

import (
	"math/rand/v2"
	"testing"
	"unicode/utf8"
)

func TestSafeName(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"eth0", "eth0"},
		{"lo", "lo"},
		{"", ""},
		{"cali1234abcd", "cali1234abcd"},
		{"pid:42", "pid:42"},
		{"e\xffx", `e\xffx`},
		{"\x1b[31mred", `\x1b[31mred`},
		{"a\nb", `a\x0ab`},
		{`a\b`, `a\\b`},
		{`e\xffx`, `e\\xffx`}, // the literal text differs from the byte
		{"ünï", "ünï"},
		{"a\u202eb", `a\u{202e}b`},
		{"a\u0085b", `a\u{0085}b`},
		{"a\x7f", `a\x7f`},
		{"\xe2\x82", `\xe2\x82`}, // a truncated rune
	} {
		if got := SafeName(tc.in); got != tc.want {
			t.Errorf("SafeName(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// checkSafe fails when a name's safe form is not valid UTF-8 or holds a
// character a terminal would act on.
func checkSafe(t *testing.T, in string) string {
	t.Helper()
	out := SafeName(in)
	if !utf8.ValidString(out) {
		t.Fatalf("SafeName(%q) = %q: not valid UTF-8", in, out)
	}
	for _, r := range out {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r <= 0x9f) || isFormatControl(r) {
			t.Fatalf("SafeName(%q) = %q holds %U", in, out, r)
		}
	}
	return out
}

// Random byte strings: every safe form is safe, and no two different names
// share one (a metric label set stays unique).
func TestSafeNameRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []string{"a", "\\", "x", "f", "0", "\xff", "\x1b", "\u202e", "\xe2", "\x82", "\xac", "\u20ac", "u", "{", "}"}
	seen := map[string]string{}
	for range 200000 {
		n := rng.IntN(6)
		var s string
		for range n {
			s += alphabet[rng.IntN(len(alphabet))]
		}
		out := checkSafe(t, s)
		if prev, ok := seen[out]; ok && prev != s {
			t.Fatalf("%q and %q both become %q", prev, s, out)
		}
		seen[out] = s
	}
}

func FuzzSafeName(f *testing.F) {
	for _, s := range []string{"eth0", "e\xffx", "\x1b[31mred", `a\b`, "a\u202eb"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { checkSafe(t, s) })
}
