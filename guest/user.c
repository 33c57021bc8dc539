/*
 * The ring-3 side: everything that is not setup. Runs natively under PVM.
 *
 * The BSP waits for the APs, prints the banner, reads the command line,
 * splits free RAM into per-CPU slices and prints `ready`; then all CPUs run
 * the selected workloads:
 *
 *   tick   the LAPIC timer interrupts every tick_ms; the ring-0 handler
 *          counts, and this loop prints `tick N cpu=I` for every count.
 *   sweep  increment the first byte of every 4 KiB page of this CPU's
 *          slices in ascending order, forever (QEMU's migration-test
 *          pattern); `sweep N cpu=I` after each pass. Once a CPU has
 *          printed `sweep 1`, its pages hold the pattern the host checks.
 *   tsc    check that rdtsc never goes backwards on this CPU.
 *
 * The line formats are documented with their parser, in src/guest/mod.rs.
 */
#include "guest.h"
#include "x86.h"

#define AP_WAIT_MS 10000   /* for the CPUs the MADT or MP table promised */
#define AP_QUIET_MS 500	   /* without either: stop after this much quiet */
#define AP_MIN_WAIT_MS 1000 /* ... but not before this */
#define POLL_PAGES 4	   /* sweep: poll ticks and the TSC this often */

/* ---- BSP: bring-up report ---------------------------------------------- */

static uint32_t arrived(void)
{
	return __atomic_load_n(&ap_arrival, __ATOMIC_ACQUIRE) & ~AP_DOOR_CLOSED;
}

/* Wait (bounded) for the APs, close the door, wait for their ring-0 setup. */
static void wait_for_aps(void)
{
	uint32_t expected = boot.expected_cpus, waited = 0, quiet = 0, last = 0, n, i;

	if (expected) {
		while (arrived() + 1 < expected && waited++ < AP_WAIT_MS)
			lapic_delay_us(1000);
	} else {
		/* No CPU table: count whoever answered the broadcast. */
		while (waited < AP_MIN_WAIT_MS || quiet < AP_QUIET_MS) {
			if (waited++ >= AP_WAIT_MS)
				break;
			n = arrived();
			quiet = n == last ? quiet + 1 : 0;
			last = n;
			lapic_delay_us(1000);
		}
	}
	n = __atomic_fetch_or(&ap_arrival, AP_DOOR_CLOSED, __ATOMIC_SEQ_CST) & ~AP_DOOR_CLOSED;
	for (i = 1; i <= n; i++)
		while (!__atomic_load_n(&cpus[i].online, __ATOMIC_ACQUIRE))
			cpu_relax();
	boot.ncpus = n + 1;
}

/*
 * Split the RAM above boot.free_start into boot.ncpus equal runs of pages
 * in address order; CPU i gets run i, cut to sweep_mb. A run that crosses a
 * hole in the memory map becomes several slices.
 */
static void compute_slices(void)
{
	struct slice free[MAX_MEMMAP], t;
	uint32_t nfree = 0, i, j;
	uint64_t total = 0, per, take;

	for (i = 0; i < boot.memmap_entries; i++) {
		const struct hvm_memmap_entry *m = &boot.memmap[i];
		uint64_t s = align_up(max_u64(m->addr, boot.free_start), PAGE_SIZE);
		uint64_t e = align_down(m->addr + m->size, PAGE_SIZE);

		if (m->type != E820_RAM || s >= e)
			continue;
		free[nfree].start = s;
		free[nfree].end = e;
		for (j = nfree++; j > 0 && free[j - 1].start > free[j].start; j--)
			t = free[j], free[j] = free[j - 1], free[j - 1] = t;
	}
	for (i = 0; i < nfree; i++)
		total += (free[i].end - free[i].start) / PAGE_SIZE;

	per = total / boot.ncpus;
	take = per;
	if (boot.cfg.sweep_mb)
		take = min_u64(per, boot.cfg.sweep_mb * (MiB / PAGE_SIZE));

	for (i = 0; i < boot.ncpus; i++) {
		struct cpu *c = &cpus[i];
		uint64_t first = i * per, left = take, skip = first;

		for (j = 0; j < nfree && left && c->nslices < MAX_SLICES; j++) {
			uint64_t pages = (free[j].end - free[j].start) / PAGE_SIZE, n;

			if (skip >= pages) {
				skip -= pages;
				continue;
			}
			n = min_u64(pages - skip, left);
			c->slices[c->nslices].start = free[j].start + skip * PAGE_SIZE;
			c->slices[c->nslices].end = c->slices[c->nslices].start + n * PAGE_SIZE;
			c->nslices++;
			left -= n;
			skip = 0;
		}
	}
}

static void bsp_report(void)
{
	uint32_t i, j;

	wait_for_aps();
	print("ferry-guest: cpus=%u ram=%lu cmdline=\"%s\"", boot.ncpus, boot.ram_bytes,
	      boot.cmdline);
	parse_cmdline(boot.cmdline, &boot.cfg);
	if (boot.expected_cpus && boot.ncpus != boot.expected_cpus)
		print("warning: the firmware lists %u cpus, %u came online", boot.expected_cpus,
		      boot.ncpus);
	for (i = 0; i < boot.ncpus; i++)
		print("cpu %u online apic=%u", i, cpus[i].apic_id);
	if (boot.cfg.run & RUN_SWEEP) {
		compute_slices();
		if (!cpus[0].nslices)
			print("warning: no free RAM to sweep");
		for (i = 0; i < boot.ncpus; i++)
			for (j = 0; j < cpus[i].nslices; j++)
				print("slice cpu=%u start=0x%lx end=0x%lx", i,
				      cpus[i].slices[j].start, cpus[i].slices[j].end);
	}
	print("ready");
}

/* ---- actions (BSP) ------------------------------------------------------ */

static void do_actions(void)
{
	if (boot.cfg.run & RUN_RESET) {
		/* The i8042 "pulse reset line" command, as Linux's reboot=k. */
		print("resetting");
		outb(0x64, 0xfe);
		lapic_delay_us(1000000);
		print("warning: reset through port 0x64 did nothing");
	}
	if (boot.cfg.run & RUN_TRIPLEFAULT) {
		print("triple-faulting");
		__asm__ volatile("int $0x80" : : "D"((uint64_t)SYS_TRIPLE_FAULT) : "memory");
		print("warning: still alive after the triple fault");
	}
}

/* ---- workloads (every CPU) --------------------------------------------- */

/* Periodic LAPIC timer: the bus runs at 1 GHz, so count = period in ns. */
static void arm_timer(void)
{
	static const uint8_t div_code[8] = { 0xb, 0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xa };
	uint64_t count = boot.cfg.tick_ms * 1000000;
	uint32_t shift = 0;

	while (count >> shift > 0xffffffffUL && shift < 7)
		shift++;
	count >>= shift;
	if (count > 0xffffffffUL)
		count = 0xffffffffUL;
	lapic_write(APIC_TIMER_DIV, div_code[shift]);
	lapic_write(APIC_LVT_TIMER, VEC_TIMER | APIC_TIMER_PERIODIC);
	lapic_write(APIC_TIMER_INIT, (uint32_t)count);
}

static void check_tsc(struct cpu *c)
{
	uint64_t now = rdtsc();

	if (now < c->last_tsc)
		print("tsc backwards cpu=%u prev=0x%lx now=0x%lx", c->index, c->last_tsc, now);
	c->last_tsc = now;
}

/*
 * echo: the BSP reads the UART's receive buffer and prints each line it got
 * back as "echo: ...", proving host input reaches the guest. Each check is a
 * port read (a VM exit), so it runs only when asked for.
 */
#define COM1_RBR 0x3f8
#define COM1_LSR_PORT 0x3fd
#define LSR_DATA_READY 0x01

static void poll_input(void)
{
	static char line[128];
	static uint32_t len;

	while (inb(COM1_LSR_PORT) & LSR_DATA_READY) {
		char ch = (char)inb(COM1_RBR);

		if (ch == '\r' || ch == '\n') {
			if (len) {
				line[len] = 0;
				print("echo: %s", line);
				len = 0;
			}
		} else if (len < sizeof(line) - 1) {
			line[len++] = ch;
		}
	}
}

/* Between pages: report new ticks (every one of them) and check the TSC. */
static void poll(struct cpu *c)
{
	uint32_t run = boot.cfg.run;

	if (c->index == 0 && (run & RUN_ECHO))
		poll_input();
	if (run & RUN_TSC)
		check_tsc(c);
	if (!(run & RUN_TICK))
		return;
	while (c->ticks_printed < c->ticks) {
		c->ticks_printed++;
		print("tick %lu cpu=%u", c->ticks_printed, c->index);
		if (run & RUN_TSC)
			check_tsc(c);
	}
}

/*
 * One pass over this CPU's slices in ascending order. The first pass stores
 * 1 instead of incrementing: RAM need not be zero at boot (firmware leaves
 * data in pages the memory map calls RAM, and a reset keeps the old
 * contents), and this brings every page into the pattern. After pass N
 * each page holds N (mod 256).
 */
static void sweep_pass(struct cpu *c, bool first)
{
	uint32_t s;

	for (s = 0; s < c->nslices; s++) {
		uint64_t p;

		for (p = c->slices[s].start; p < c->slices[s].end; p += PAGE_SIZE) {
			volatile uint8_t *b = (volatile uint8_t *)p;

			*b = first ? 1 : *b + 1;
			if (++c->pages_since_poll == POLL_PAGES) {
				c->pages_since_poll = 0;
				poll(c);
			}
		}
	}
}

static void __attribute__((noreturn)) sweep_forever(struct cpu *c)
{
	for (;;) {
		sweep_pass(c, c->sweeps == 0);
		c->sweeps++;
		print("sweep %lu cpu=%u", c->sweeps, c->index);
	}
}

void user_main(struct cpu *c)
{
	if (c->index == 0) {
		bsp_report();
		/* Wake the APs, asleep in ap_main(). */
		__atomic_store_n(&go, 1, __ATOMIC_RELEASE);
		lapic_write(APIC_ICR_HI, 0);
		lapic_write(APIC_ICR_LO, APIC_ICR_ALL_BUT_SELF | VEC_WAKE);
		do_actions();
	}

	c->last_tsc = rdtsc();
	if (boot.cfg.run & RUN_TICK)
		arm_timer();
	if ((boot.cfg.run & RUN_SWEEP) && c->nslices)
		sweep_forever(c);
	for (;;) {
		poll(c);
		cpu_relax();
	}
}
