/*
 * Command-line settings, read the way Linux reads its command line: words
 * separated by spaces, `key=value`. Only words starting with "ferry." are
 * ours; others are ignored. A ferry.* word we do not understand gets a
 * warning line and is otherwise ignored. Runs in ring 3 (BSP).
 *
 *   ferry.run=tick,sweep,tsc   workloads (default: all three); `disk` and the
 *                              actions `reset`, `triplefault`, `poweroff` and `echo` may be added
 *   ferry.tick_ms=N            LAPIC timer period in ms (default 1000)
 *   ferry.idle=hlt|poll        what a CPU with nothing to do does between ticks:
 *                              halt (as an idle OS does, leaving the host core
 *                              free) or spin in ring 3 (default)
 *   ferry.sweep_mb=N           cap on each CPU's slices in MiB (0/absent: none)
 *   ferry.fill=PERCENT         fill this share (0..100) of free RAM once, before
 *                              `ready`; the sweep leaves it alone (default 0)
 *   ferry.dirty_mbps=N         pace the sweep to N MiB/s over all CPUs
 *                              (0/absent: as fast as it goes)
 *   ferry.blackout[=MS]        report every TSC gap longer than MS ms (bare: 1;
 *                              0/absent: off)
 *   ferry.disk_blocks=N        4 KiB blocks the disk workload uses (0/absent: the
 *                              whole disk, at most 4096)
 */
#include "guest.h"

#define WORD_MAX 256

/* word[0..len) as a C string, for messages. */
static const char *cstr(char *buf, const char *s, size_t len)
{
	if (len > WORD_MAX - 1)
		len = WORD_MAX - 1;
	memcpy(buf, s, len);
	buf[len] = 0;
	return buf;
}

static bool parse_u64(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;
	size_t i;

	if (!len)
		return false;
	for (i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9' || v > (~0UL - 9) / 10)
			return false;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	*out = v;
	return true;
}

static bool is(const char *s, size_t len, const char *name)
{
	return strlen(name) == len && !strncmp(s, name, len);
}

static uint32_t parse_run(const char *s, size_t len)
{
	static const struct {
		const char *name;
		uint32_t bit;
	} names[] = {
		{ "tick", RUN_TICK },	{ "sweep", RUN_SWEEP },
		{ "tsc", RUN_TSC },	{ "reset", RUN_RESET },
		{ "triplefault", RUN_TRIPLEFAULT }, { "echo", RUN_ECHO },
		{ "disk", RUN_DISK },	{ "poweroff", RUN_POWEROFF },
	};
	char buf[WORD_MAX];
	uint32_t run = 0, i;

	while (len) {
		size_t n = 0;
		bool found = false;

		while (n < len && s[n] != ',')
			n++;
		for (i = 0; n && i < sizeof(names) / sizeof(names[0]); i++) {
			if (is(s, n, names[i].name)) {
				run |= names[i].bit;
				found = true;
			}
		}
		if (n && !found)
			print("warning: unknown workload %s in ferry.run", cstr(buf, s, n));
		s += n, len -= n;
		if (len)
			s++, len--; /* the comma */
	}
	return run;
}

static void parse_word(const char *w, size_t len, struct config *cfg)
{
	const char *key = w + 6, *val;
	size_t klen = 0, vlen;
	char buf[WORD_MAX];
	uint64_t v;

	while (6 + klen < len && key[klen] != '=')
		klen++;
	val = key + klen + (6 + klen < len ? 1 : 0);
	vlen = (size_t)(w + len - val);

	if (is(key, klen, "tick_ms")) {
		if (parse_u64(val, vlen, &v) && v > 0)
			cfg->tick_ms = v;
		else
			print("warning: bad value in %s", cstr(buf, w, len));
	} else if (is(key, klen, "sweep_mb")) {
		if (parse_u64(val, vlen, &v))
			cfg->sweep_mb = v;
		else
			print("warning: bad value in %s", cstr(buf, w, len));
	} else if (is(key, klen, "fill")) {
		if (parse_u64(val, vlen, &v) && v <= 100)
			cfg->fill_pct = v;
		else
			print("warning: bad value in %s", cstr(buf, w, len));
	} else if (is(key, klen, "dirty_mbps")) {
		if (parse_u64(val, vlen, &v))
			cfg->dirty_mbps = v;
		else
			print("warning: bad value in %s", cstr(buf, w, len));
	} else if (is(key, klen, "blackout")) {
		if (6 + klen == len)
			cfg->blackout_ms = 1; /* a bare ferry.blackout */
		else if (parse_u64(val, vlen, &v) && v <= 3600000)
			cfg->blackout_ms = v;
		else
			print("warning: bad value in %s", cstr(buf, w, len));
	} else if (is(key, klen, "disk_blocks")) {
		if (parse_u64(val, vlen, &v))
			cfg->disk_blocks = v;
		else
			print("warning: bad value in %s", cstr(buf, w, len));
	} else if (is(key, klen, "idle")) {
		if (vlen == 3 && val[0] == 'h' && val[1] == 'l' && val[2] == 't')
			cfg->idle_hlt = true;
		else if (vlen == 4 && val[0] == 'p' && val[1] == 'o' && val[2] == 'l' && val[3] == 'l')
			cfg->idle_hlt = false;
		else
			print("warning: bad value in %s", cstr(buf, w, len));
	} else if (is(key, klen, "run")) {
		cfg->run = parse_run(val, vlen);
	} else {
		print("warning: unknown option %s", cstr(buf, w, len));
	}
}

void parse_cmdline(const char *s, struct config *cfg)
{
	cfg->run = RUN_DEFAULT;
	cfg->tick_ms = 1000;
	cfg->sweep_mb = 0;
	cfg->fill_pct = 0;
	cfg->dirty_mbps = 0;
	cfg->blackout_ms = 0;
	cfg->disk_blocks = 0;
	cfg->idle_hlt = false;

	while (*s) {
		size_t len = 0;

		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		while (s[len] && s[len] != ' ' && s[len] != '\t' && s[len] != '\n')
			len++;
		if (len > 6 && !strncmp(s, "ferry.", 6))
			parse_word(s, len, cfg);
		s += len;
	}
}
