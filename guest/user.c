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
 * and, when the command line asks for them:
 *
 *   fill      (ferry.fill) before `ready`, the BSP fills the low end of free
 *             RAM with a fixed non-zero pattern (fill_word()) that nothing
 *             changes afterwards; the slices cover only the rest.
 *   pace      (ferry.dirty_mbps) each CPU waits on the TSC before each page
 *             so that all CPUs together write about N MiB/s.
 *   blackout  (ferry.blackout) each CPU notes the longest stretch between
 *             two of its TSC readings (taken at every poll and for every
 *             byte it prints) and reports one over the threshold as `gap`;
 *             a stretch across which the host stopped the CPU (KVM's clock
 *             says so) is reported apart, as `gap ... stopped`, whatever
 *             its length.
 *   disk      (ferry.run=disk) the BSP drives a virtio-blk device (disk.c)
 *             from its poll(), one request at a time.
 *
 * The last two need the TSC frequency, measured against the LAPIC timer.
 *
 * The line formats are documented with their parser, in src/guest/mod.rs.
 */
#include "guest.h"
#include "x86.h"

#define AP_WAIT_MS 10000   /* for the CPUs the MADT or MP table promised */
#define AP_QUIET_MS 500	   /* without either: stop after this much quiet */
#define AP_MIN_WAIT_MS 1000 /* ... but not before this */
#define POLL_PAGES 4	   /* sweep: poll ticks and the TSC this often */
#define CAL_NS 25000000	   /* TSC calibration: this long against the LAPIC timer */
#define GAP_FLOOR_US 20	   /* blackout: shorter stretches between readings are no gap */
#define STOP_FLAG_LAG_US 1500 /* blackout: how late the stop flag may be seen (note_stop_gap()) */
#define CAL_TRIES 5	   /* ... each end the narrowest of this many samples */
#define PACE_SLACK_MS 50   /* dirty_mbps: catch up on at most this much lag */

/* ---- the TSC frequency -------------------------------------------------- */

/*
 * One (TSC, LAPIC current count) sample: the count read between two TSC
 * reads, the TSC taken as their midpoint. Of a few tries the narrowest
 * wins; a read is an MMIO exit and the vCPU may be preempted in it.
 */
static void tsc_lapic_sample(uint64_t *tsc, uint32_t *count)
{
	uint64_t best = ~0UL, a, b;
	uint32_t i, n;

	for (i = 0; i < CAL_TRIES; i++) {
		a = rdtsc();
		n = lapic_read(APIC_TIMER_CUR);
		b = rdtsc();
		if (b - a < best) {
			best = b - a;
			*tsc = a + (b - a) / 2;
			*count = n;
		}
	}
}

/*
 * The TSC against the LAPIC timer, whose bus runs at 1 GHz under KVM (as
 * arm_timer() and lapic_delay_us() assume), over CAL_NS; in kHz, 0 if
 * the timer did not move. The timer is stopped again, masked.
 */
static uint64_t tsc_khz_from_lapic(void)
{
	uint64_t t0 = 0, t1 = 0;
	uint32_t c0 = 0, c1 = 0;

	lapic_write(APIC_LVT_TIMER, APIC_LVT_MASKED | VEC_TIMER);
	lapic_write(APIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(APIC_TIMER_INIT, 0xffffffff);
	tsc_lapic_sample(&t0, &c0);
	while (c0 - lapic_read(APIC_TIMER_CUR) < CAL_NS)
		cpu_relax();
	tsc_lapic_sample(&t1, &c1);
	lapic_write(APIC_TIMER_INIT, 0);
	if (c0 <= c1 || t1 <= t0)
		return 0;
	/* cycles per ns × 10^6 = kHz, rounded */
	return ((t1 - t0) * 1000000 + (c0 - c1) / 2) / (c0 - c1);
}

/* The TSC frequency CPUID states, in kHz, or 0. */
static uint64_t tsc_khz_from_cpuid(void)
{
	uint32_t r[4];

	cpuid(0x40000000, 0, r); /* hypervisor leaves; 0x40000010: TSC kHz */
	if (r[0] >= 0x40000010 && r[0] < 0x40000100) {
		cpuid(0x40000010, 0, r);
		if (r[0])
			return r[0];
	}
	cpuid(0, 0, r);
	if (r[0] >= 0x15) {
		cpuid(0x15, 0, r); /* TSC = crystal (ecx Hz) × ebx / eax */
		if (r[0] && r[1] && r[2])
			return (uint64_t)r[2] * r[1] / r[0] / 1000;
	}
	if (r[0] >= 0x16) {
		cpuid(0x16, 0, r); /* base frequency, MHz */
		if (r[0])
			return (uint64_t)r[0] * 1000;
	}
	return 0;
}

/* Measure the TSC once, for dirty_mbps and blackout; prints `tsc khz=N`. */
static void measure_tsc(void)
{
	uint64_t khz = tsc_khz_from_lapic();

	/* Believe 100 MHz .. 20 GHz only. */
	if (khz < 100000 || khz > 20000000) {
		print("warning: the LAPIC timer gave a TSC of %lu kHz; asking CPUID", khz);
		khz = tsc_khz_from_cpuid();
	}
	if (khz < 100000 || khz > 20000000) {
		print("warning: TSC frequency unknown; ferry.dirty_mbps and ferry.blackout are off");
		return;
	}
	boot.tsc_khz = khz;
	print("tsc khz=%lu", khz);
}

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
 * Free RAM: the RAM above boot.free_start, page aligned, as ranges in
 * address order. Returns how many; *pages gets their total in pages.
 */
static uint32_t free_ranges(struct slice *free, uint64_t *pages)
{
	struct slice t;
	uint32_t nfree = 0, i, j;

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
	*pages = 0;
	for (i = 0; i < nfree; i++)
		*pages += (free[i].end - free[i].start) / PAGE_SIZE;
	return nfree;
}

/*
 * Take `bytes` from the low end of free RAM, for good: the fill and the
 * slices start above it. Returns its address, or 0 if no range is big enough.
 */
static uint64_t reserve_ram(uint64_t bytes)
{
	struct slice free[MAX_MEMMAP];
	uint64_t pages;
	uint32_t nfree = free_ranges(free, &pages), i;

	for (i = 0; i < nfree; i++) {
		if (free[i].end - free[i].start >= bytes) {
			boot.free_start = free[i].start + bytes;
			return free[i].start;
		}
	}
	return 0;
}

/*
 * The fill pattern: the 64-bit little-endian word at guest-physical address
 * `a` (8-aligned). Every byte is odd, so never zero. The host's copy of
 * this is ferry::guest::fill_word().
 */
static inline uint64_t fill_word(uint64_t a)
{
	uint64_t x = a * 0x9e3779b97f4a7c15UL;

	return (x ^ (x >> 32)) | 0x0101010101010101UL;
}

/*
 * ferry.fill: write the pattern over the first fill_pct % of free RAM's
 * pages, in address order, and print one `fill` line per range written.
 * Runs before `ready`, with the APs asleep. Returns the pages filled.
 */
static uint64_t fill_ram(const struct slice *free, uint32_t nfree, uint64_t total)
{
	uint64_t left = total * boot.cfg.fill_pct / 100, filled = 0;
	uint32_t j;

	for (j = 0; j < nfree && left; j++) {
		uint64_t n = min_u64((free[j].end - free[j].start) / PAGE_SIZE, left);
		uint64_t end = free[j].start + n * PAGE_SIZE, p, i;

		for (p = free[j].start; p < end; p += PAGE_SIZE) {
			volatile uint64_t *w = (volatile uint64_t *)p;

			for (i = 0; i < PAGE_SIZE / 8; i++)
				w[i] = fill_word(p + 8 * i);
		}
		print("fill pages=%lu start=0x%lx end=0x%lx", n, free[j].start, end);
		left -= n;
		filled += n;
	}
	return filled;
}

/*
 * Split the free RAM after the first `skip` pages (the fill) into
 * boot.ncpus equal runs of pages in address order; CPU i gets run i, cut
 * to sweep_mb. A run that crosses a hole in the memory map becomes several
 * slices.
 */
static void compute_slices(const struct slice *free, uint32_t nfree, uint64_t total,
			   uint64_t skip_pages)
{
	uint64_t per, take;
	uint32_t i, j;

	per = (total - skip_pages) / boot.ncpus;
	take = per;
	if (boot.cfg.sweep_mb)
		take = min_u64(per, boot.cfg.sweep_mb * (MiB / PAGE_SIZE));

	for (i = 0; i < boot.ncpus; i++) {
		struct cpu *c = &cpus[i];
		uint64_t left = take, skip = skip_pages + i * per;

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

/*
 * dirty_mbps: N MiB/s is N × 256 pages/s over the CPUs that sweep, so each
 * waits tsc_hz × sweepers / (N × 256) cycles per page (kept in 16.16 fixed
 * point: tsc_hz × sweepers × 256 / N).
 */
static void setup_pace(void)
{
	uint64_t sweepers = 0;
	uint32_t i;

	for (i = 0; i < boot.ncpus; i++)
		sweepers += cpus[i].nslices ? 1 : 0;
	if (!boot.tsc_khz || !boot.cfg.dirty_mbps || !sweepers)
		return;
	boot.pace_fp = boot.tsc_khz * 1000 * sweepers * 256 / boot.cfg.dirty_mbps;
	boot.pace_slack = boot.tsc_khz * PACE_SLACK_MS;
}

static void bsp_report(void)
{
	struct slice free[MAX_MEMMAP];
	uint64_t total, filled = 0;
	uint32_t i, j, nfree;

	wait_for_aps();
	print("ferry-guest: cpus=%u ram=%lu cmdline=\"%s\"", boot.ncpus, boot.ram_bytes,
	      boot.cmdline);
	parse_cmdline(boot.cmdline, &boot.cfg);
	if (boot.expected_cpus && boot.ncpus != boot.expected_cpus)
		print("warning: the firmware lists %u cpus, %u came online", boot.expected_cpus,
		      boot.ncpus);
	for (i = 0; i < boot.ncpus; i++)
		print("cpu %u online apic=%u", i, cpus[i].apic_id);
	if (boot.cfg.dirty_mbps || boot.cfg.blackout_ms)
		measure_tsc();
	boot.gap_cycles = boot.tsc_khz * boot.cfg.blackout_ms;
	boot.gap_floor_cycles = boot.tsc_khz * GAP_FLOOR_US / 1000;
	boot.stop_lag_cycles = boot.tsc_khz * STOP_FLAG_LAG_US / 1000;
	if (boot.gap_cycles && !boot.kvm_clock)
		print("warning: no KVM clock; ferry.blackout cannot tell a host's stop of a CPU from a preemption");
	if (boot.cfg.run & RUN_DISK)
		disk_setup(reserve_ram(DISK_MEM_BYTES));
	nfree = free_ranges(free, &total);
	if (boot.cfg.fill_pct)
		filled = fill_ram(free, nfree, total);
	if (boot.cfg.run & RUN_SWEEP) {
		compute_slices(free, nfree, total, filled);
		setup_pace();
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

volatile uint64_t power_presses;

/*
 * As Linux powers off a hardware-reduced ACPI machine: SLP_EN with the sleep
 * type of \_S5, which is 5 in ferry's DSDT, to the FADT's sleep control
 * register.
 */
static void power_off(void)
{
	if (!boot.sleep_port) {
		print("warning: the FADT has no sleep control register");
		return;
	}
	print("powering off through port 0x%x", boot.sleep_port);
	outb(boot.sleep_port, (5 << 2) | (1 << 5));
	lapic_delay_us(1000000);
	print("warning: still running after the power-off");
}

static void do_actions(void)
{
	if (boot.cfg.run & RUN_RESET) {
		/* The i8042 "pulse reset line" command, as Linux's reboot=k. */
		print("resetting");
		outb(0x64, 0xfe);
		lapic_delay_us(1000000);
		print("warning: reset through port 0x64 did nothing");
	}
	if (boot.cfg.run & RUN_POWEROFF)
		power_off();
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

/*
 * blackout: the CPU whose stacks hold %rsp (bsp_main() and alloc_stacks()
 * give each CPU its ring-0 stack and then its ring-3 stack, in index
 * order), or NULL.
 */
static struct cpu *this_cpu(void)
{
	uint64_t sp = read_rsp(), base = cpus[0].kstack_top - KSTACK_SIZE, i;
	struct cpu *c;

	if (sp < base)
		return NULL;
	i = (sp - base) / (KSTACK_SIZE + USTACK_SIZE);
	if (i >= boot.ncpus)
		return NULL;
	c = &cpus[i];
	return sp >= c->kstack_top - KSTACK_SIZE && sp < c->ustack_top ? c : NULL;
}

/*
 * blackout: whether the host stopped this CPU since the last call. KVM sets
 * the flag as the vCPU goes back in, so the first TSC reading after a stop
 * sees it.
 */
static bool host_stopped(struct cpu *c)
{
	const uint8_t stopped = PVCLOCK_GUEST_STOPPED;

	if (!boot.kvm_clock || !(__atomic_load_n(&c->clock.flags, __ATOMIC_RELAXED) & stopped))
		return false;
	__atomic_fetch_and(&c->clock.flags, (uint8_t)~stopped, __ATOMIC_RELAXED);
	return true;
}

/* blackout: the gap across a stop, which ended at TSC end, to be reported at the next poll. */
static void note_stop(struct cpu *c, uint64_t cycles, uint64_t end)
{
	c->stop_gap = cycles;
	c->stop_gap_end = end;
	c->stop_pending = true;
}

/*
 * blackout: the gap across a stop, from the TSC reading that saw the flag
 * (now, d cycles after the previous one). KVM rewrites the clock page as the
 * vCPU goes back in, stamping it with the TSC of that moment (tsc_timestamp),
 * so the stop's gap is the one that holds that stamp: usually d itself, as
 * the flag is seen at the first reading, but a stall right before the stop or
 * right after it is a gap of its own and must not pass for the stop's. A stop
 * takes an exit and an entry, so no stretch under the floor is one. The stamp
 * can lie elsewhere (KVM's clock rewritten since, or stamped from an older
 * reference); then the stop's gap is the longest of d and the gaps that ended
 * in the STOP_FLAG_LAG_US before, as the flag can be seen a gap or two late.
 */
static void note_stop_gap(struct cpu *c, uint64_t now, uint64_t d)
{
	uint64_t stamp = __atomic_load_n(&c->clock.tsc_timestamp, __ATOMIC_RELAXED);
	uint64_t longest = d > boot.gap_floor_cycles ? d : 0, end = now;
	uint32_t i;

	if (longest && stamp > now - d && stamp <= now)
		goto found;
	for (i = 0; i < RECENT_GAPS; i++) {
		uint64_t gap_end = c->recent[i].end, cycles = c->recent[i].cycles;
		int holds_stamp = stamp > gap_end - cycles && stamp <= gap_end;

		if (!cycles || now - gap_end > boot.stop_lag_cycles)
			continue;
		if (holds_stamp || cycles > longest) {
			longest = cycles;
			end = gap_end;
		}
		if (holds_stamp)
			break;
	}
found:
	/* Still held back as a stall (see poll()): it is the stop's, reported as such. */
	if (c->gap_pending == longest && c->gap_pending_end == end)
		c->gap_pending = 0;
	note_stop(c, longest, end);
}

/* blackout: a gap of d cycles that ended at now: kept for a late stop flag, and a stall. */
static void note_gap(struct cpu *c, uint64_t d, uint64_t now)
{
	if (d <= boot.gap_floor_cycles)
		return;
	c->recent[c->recent_next].cycles = d;
	c->recent[c->recent_next].end = now;
	c->recent_next = (c->recent_next + 1) % RECENT_GAPS;
	if (d > boot.gap_cycles && d > c->gap_pending) {
		c->gap_pending = d;
		c->gap_pending_end = now;
	}
}

/*
 * blackout: a TSC reading. The gap across a host stop is kept apart, however
 * short; of the others, the longest over the threshold.
 */
static void gap_check(struct cpu *c)
{
	uint64_t now = rdtsc(), d = now > c->gap_last ? now - c->gap_last : 0;

	c->gap_last = now;
	if (host_stopped(c))
		note_stop_gap(c, now, d);
	else
		note_gap(c, d, now);
}

/*
 * From print.c, for every byte written and every spin on the serial lock:
 * a vCPU stopped in the middle of a line is seen too. Reported later, from
 * poll(), as the lock may be held.
 */
void gap_note(void)
{
	struct cpu *c;

	if (!boot.gap_cycles)
		return;
	c = this_cpu();
	if (c && c->gap_last)
		gap_check(c);
}

static uint64_t cycles_to_us(uint64_t cycles)
{
	return cycles * 1000 / boot.tsc_khz;
}

/* blackout: how long before this CPU's last TSC reading TSC tsc was, in µs. */
static uint64_t us_before_last_reading(const struct cpu *c, uint64_t tsc)
{
	return c->gap_last > tsc ? cycles_to_us(c->gap_last - tsc) : 0;
}

/* Between pages: report new ticks (every one of them) and check the TSC. */
static void poll(struct cpu *c)
{
	uint32_t run = boot.cfg.run;

	/*
	 * A gap is printed well after it ended (held back, or behind a queue of
	 * ticks to print), so its line says how long ago it ended, as of the
	 * reading just taken: whoever reads it can place it in time.
	 */
	if (boot.gap_cycles) {
		gap_check(c);
		if (c->stop_pending) {
			c->stop_pending = false;
			print("gap cpu=%u us=%lu ago=%lu stopped", c->index, cycles_to_us(c->stop_gap),
			      us_before_last_reading(c, c->stop_gap_end));
		}
		/* Until a late stop flag could no longer claim it as the stop's. */
		if (c->gap_pending && c->gap_last - c->gap_pending_end > boot.stop_lag_cycles) {
			uint64_t us = cycles_to_us(c->gap_pending);

			c->gap_pending = 0;
			print("gap cpu=%u us=%lu ago=%lu", c->index, us,
			      us_before_last_reading(c, c->gap_pending_end));
		}
	}

	if (c->index == 0 && power_presses) {
		power_presses = 0;
		print("power button");
		power_off();
	}
	if (c->index == 0 && (run & RUN_ECHO))
		poll_input();
	if (c->index == 0 && (run & RUN_DISK))
		disk_poll();
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
 * ferry.idle=hlt: a CPU with nothing to do halts until an interrupt, as an
 * idle OS does. The tick wakes it (and, on the BSP, the disk's interrupt), so
 * it needs the timer; the echo workload polls the UART and must spin.
 */
static bool can_halt(struct cpu *c)
{
	uint32_t run = boot.cfg.run;

	return boot.cfg.idle_hlt && (run & RUN_TICK) && !(c->index == 0 && (run & RUN_ECHO));
}

/*
 * One halt. For ferry.blackout a halt is not a gap in itself: a CPU woken by
 * ticks measures how late the last of them came against the tick period, and
 * reports what exceeds it (a vCPU stopped across a tick delays it by that
 * long). That lateness is also all a CPU halted through a host stop can say
 * of it: its timer came that much late, perhaps not at all.
 */
static void idle(struct cpu *c)
{
	uint64_t tick, tsc, late = 0;

	__asm__ volatile("int $0x80" : : "D"((uint64_t)SYS_IDLE) : "memory");
	if (!boot.gap_cycles)
		return;
	tick = c->ticks;
	tsc = c->tick_tsc;
	if (tick > c->idle_tick && c->idle_tsc) {
		uint64_t due = c->idle_tsc + (tick - c->idle_tick) * boot.cfg.tick_ms * boot.tsc_khz;

		late = tsc > due ? tsc - due : 0;
	}
	c->idle_tick = tick;
	c->idle_tsc = tsc;
	c->gap_last = rdtsc();
	if (host_stopped(c))
		note_stop(c, late, tsc);
	else
		note_gap(c, late, tsc);
}

/*
 * dirty_mbps: wait until this CPU may write its next page, then book the
 * page. Lag of up to PACE_SLACK_MS (the host preempted the vCPU) is caught
 * up at full speed; beyond that (a long stop) the schedule restarts from now.
 */
static void pace(struct cpu *c)
{
	uint64_t now = rdtsc();

	if ((int64_t)(now - c->pace_next) > (int64_t)boot.pace_slack) {
		c->pace_next = now;
		c->pace_frac = 0;
	}
	while ((int64_t)(c->pace_next - now) > 0) {
		poll(c);
		cpu_relax();
		now = rdtsc();
	}
	c->pace_frac += boot.pace_fp & 0xffff;
	c->pace_next += (boot.pace_fp >> 16) + (c->pace_frac >> 16);
	c->pace_frac &= 0xffff;
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

			if (boot.pace_fp)
				pace(c);
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

	if (boot.gap_cycles && boot.kvm_clock)
		__asm__ volatile("int $0x80" : : "D"((uint64_t)SYS_KVM_CLOCK) : "memory");
	c->last_tsc = rdtsc();
	c->pace_next = c->last_tsc;
	if (boot.gap_cycles)
		c->gap_last = c->last_tsc;
	if (boot.cfg.run & RUN_TICK)
		arm_timer();
	if ((boot.cfg.run & RUN_SWEEP) && c->nslices)
		sweep_forever(c);
	for (;;) {
		poll(c);
		if (can_halt(c))
			idle(c);
		else
			cpu_relax();
	}
}
