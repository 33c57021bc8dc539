/*
 * Serial output: an 8250 UART at port 0x3f8, polled.
 *
 * Used from ring 3 (IOPL=3 lets it use in/out directly) and, for fatal
 * messages, from ring 0. Each call formats one whole line into a buffer
 * first and then writes it under a spinlock, so lines from different CPUs
 * never interleave and the lock is held only while bytes go out.
 */
#include "guest.h"
#include "x86.h"

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20 /* transmit holding register empty */
#define LINE_MAX 1200 /* the banner holds the whole command line */

/*
 * A ticket lock: CPUs print in the order they asked. A plain test-and-set
 * lock let a CPU that prints line after line (ferry.blackout reports while
 * the host preempts it) keep the lock for hundreds of ms while another CPU
 * waited, its reports going stale.
 */
static volatile uint32_t ticket_next, ticket_serving;

/*
 * gap_note() (user.c) takes a TSC reading for ferry.blackout while we wait
 * and for every byte, so a print is no blind spot; it returns at once when
 * blackout is off.
 */
static void lock(void)
{
	uint32_t mine = __atomic_fetch_add(&ticket_next, 1, __ATOMIC_RELAXED);

	while (__atomic_load_n(&ticket_serving, __ATOMIC_ACQUIRE) != mine) {
		gap_note();
		cpu_relax();
	}
}

/* Takes the lock only if nobody holds it or waits for it. */
static bool try_lock(void)
{
	uint32_t serving = __atomic_load_n(&ticket_serving, __ATOMIC_ACQUIRE);
	uint32_t expected = serving;

	return __atomic_compare_exchange_n(&ticket_next, &expected, serving + 1, false,
					   __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/*
 * For fatal paths, which may interrupt the lock holder on its own CPU: a
 * ticket taken there could never be served, so only a free lock is taken.
 */
static bool lock_bounded(void)
{
	uint32_t spins;

	for (spins = 0; spins < 1000000; spins++) {
		if (try_lock())
			return true;
		cpu_relax();
	}
	return false;
}

static void unlock(void)
{
	__atomic_store_n(&ticket_serving, ticket_serving + 1, __ATOMIC_RELEASE);
}

static void put_bytes(const char *s, int n)
{
	int i;

	for (i = 0; i < n; i++) {
		gap_note();
		while (!(inb(COM1_LSR) & LSR_THRE))
			cpu_relax();
		outb(COM1, (uint8_t)s[i]);
	}
}

/* ---- a small printf: %s %c %d %u %x, with l/ll; nothing else ---------- */

struct out {
	char *buf;
	size_t size, len;
};

static void emit(struct out *o, char ch)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = ch;
	o->len++;
}

static void emit_num(struct out *o, uint64_t v, unsigned base, bool negative)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (negative)
		emit(o, '-');
	while (n)
		emit(o, tmp[--n]);
}

static int vformat(char *buf, size_t size, const char *fmt, __builtin_va_list ap)
{
	struct out o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		int longs = 0;
		uint64_t v;

		if (*fmt != '%') {
			emit(&o, *fmt);
			continue;
		}
		fmt++;
		while (*fmt == 'l')
			longs++, fmt++;
		switch (*fmt) {
		case 's': {
			const char *s = __builtin_va_arg(ap, const char *);
			while (*s)
				emit(&o, *s++);
			break;
		}
		case 'c':
			emit(&o, (char)__builtin_va_arg(ap, int));
			break;
		case 'd': {
			long sv = longs ? __builtin_va_arg(ap, long) : __builtin_va_arg(ap, int);
			emit_num(&o, sv < 0 ? -(uint64_t)sv : (uint64_t)sv, 10, sv < 0);
			break;
		}
		case 'u':
		case 'x':
			v = longs ? __builtin_va_arg(ap, unsigned long)
				  : __builtin_va_arg(ap, unsigned int);
			emit_num(&o, v, *fmt == 'u' ? 10 : 16, false);
			break;
		case '%':
			emit(&o, '%');
			break;
		default: /* unknown conversion: show it */
			emit(&o, '%');
			if (!*fmt)
				fmt--;
			else
				emit(&o, *fmt);
			break;
		}
	}
	if (o.size)
		o.buf[o.len < o.size ? o.len : o.size - 1] = 0;
	return (int)o.len;
}

/* Format "fmt\n" into buf; returns the length, truncated to fit. */
static int format_line(char *buf, const char *fmt, __builtin_va_list ap)
{
	int n = vformat(buf, LINE_MAX - 1, fmt, ap);

	if (n > LINE_MAX - 2)
		n = LINE_MAX - 2;
	buf[n++] = '\n';
	return n;
}

void print(const char *fmt, ...)
{
	char buf[LINE_MAX];
	__builtin_va_list ap;
	int n;

	__builtin_va_start(ap, fmt);
	n = format_line(buf, fmt, ap);
	__builtin_va_end(ap);
	lock();
	put_bytes(buf, n);
	unlock();
}

void print_fatal(const char *fmt, ...)
{
	char buf[LINE_MAX];
	__builtin_va_list ap;
	bool locked;
	int n;

	__builtin_va_start(ap, fmt);
	n = format_line(buf, fmt, ap);
	__builtin_va_end(ap);
	locked = lock_bounded();
	if (!locked)
		put_bytes("\n", 1); /* we broke into someone's line */
	put_bytes(buf, n);
	if (locked)
		unlock();
}
