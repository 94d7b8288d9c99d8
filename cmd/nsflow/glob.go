package main

import (
	"fmt"
	"path"
	"regexp"
	"strings"
	"unicode/utf8"
)

// globsRegexp compiles shell patterns on names, with path.Match's semantics
// ('*', '?', '[...]' classes with '^' negation and ranges, '\' escapes),
// into one anchored regular expression: discovery selects names by
// expression, and this keeps a pattern meaning what path.Match says it means.
// A malformed pattern is an error that names it.
func globsRegexp(globs []string) (*regexp.Regexp, error) {
	alts := make([]string, 0, len(globs))
	for _, g := range globs {
		if _, err := path.Match(g, ""); err != nil {
			return nil, fmt.Errorf("bad pattern %q: %w", g, err)
		}
		re, err := globRegexp(g)
		if err != nil {
			return nil, fmt.Errorf("bad pattern %q: %w", g, err)
		}
		alts = append(alts, re)
	}
	return regexp.Compile("^(?:" + strings.Join(alts, "|") + ")$")
}

// isGlob tells a pattern from a plain name: path.Match's metacharacters.
func isGlob(s string) bool { return strings.ContainsAny(s, `*?[\`) }

// globRegexp translates one path.Match pattern. Every literal rune is
// written as \x{...}, so nothing in it is special to the regexp.
func globRegexp(g string) (string, error) {
	var b strings.Builder
	lit := func(r rune) { fmt.Fprintf(&b, `\x{%x}`, r) }
	for i := 0; i < len(g); {
		r, n := utf8.DecodeRuneInString(g[i:])
		i += n
		switch r {
		case '*':
			b.WriteString(`[^/]*`)
		case '?':
			b.WriteString(`[^/]`)
		case '\\':
			if i >= len(g) {
				return "", path.ErrBadPattern
			}
			r, n = utf8.DecodeRuneInString(g[i:])
			i += n
			lit(r)
		case '[':
			b.WriteByte('[')
			if i < len(g) && g[i] == '^' {
				b.WriteByte('^')
				i++
			}
			first := true
			for {
				if i >= len(g) {
					return "", path.ErrBadPattern
				}
				if g[i] == ']' && !first {
					i++
					break
				}
				first = false
				lo, n, err := classChar(g[i:])
				if err != nil {
					return "", err
				}
				i += n
				lit(lo)
				if i < len(g) && g[i] == '-' {
					i++
					hi, n, err := classChar(g[i:])
					if err != nil {
						return "", err
					}
					i += n
					if hi < lo {
						return "", fmt.Errorf("range %c-%c is empty", lo, hi)
					}
					b.WriteByte('-')
					lit(hi)
				}
			}
			b.WriteByte(']')
		default:
			lit(r)
		}
	}
	return b.String(), nil
}

// classChar reads one possibly escaped character of a class, as path.Match
// does.
func classChar(s string) (rune, int, error) {
	if s == "" || s[0] == '-' || s[0] == ']' {
		return 0, 0, path.ErrBadPattern
	}
	if s[0] == '\\' {
		if len(s) < 2 {
			return 0, 0, path.ErrBadPattern
		}
		r, n := utf8.DecodeRuneInString(s[1:])
		return r, n + 1, nil
	}
	r, n := utf8.DecodeRuneInString(s)
	return r, n, nil
}
