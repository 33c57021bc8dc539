/*
 * Ring-0 setup of the BSP and of each CPU.
 *
 * All of this is emulated under PVM, so it does only what must happen in
 * ring 0: copy the boot information, build page tables, load GDT/TSS/IDT,
 * enable the LAPIC, start the APs. Everything else (parsing the command
 * line, printing, computing the sweep slices, waiting for the APs) is done
 * in ring 3 by user.c.
 */
#include "guest.h"
#include "x86.h"

/* struct hvm_start_info, version 1 (xen/arch-x86/hvm/start_info.h). */
struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
};
#define HVM_START_MAGIC 0x336ec578

/* Page table entry bits. */
#define PTE_P (1UL << 0)
#define PTE_W (1UL << 1)
#define PTE_U (1UL << 2) /* ring 3 may touch everything */
#define PTE_PWT (1UL << 3)
#define PTE_PCD (1UL << 4)
#define PTE_PS (1UL << 7)
#define PTE_ADDR 0x000ffffffffff000UL

struct boot boot;
volatile uint32_t go;
struct cpu cpus[MAX_CPUS];
static uint64_t idt[256 * 2];

/* Bump allocator over the RAM after the image. Memory is not zeroed. */
static uint64_t alloc_next;

static uint64_t alloc_pages(uint64_t bytes)
{
	uint64_t p = alloc_next;

	alloc_next += align_up(bytes, PAGE_SIZE);
	return p;
}

void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Copy what we need out of hvm_start_info before anything can overwrite it. */
static void read_start_info(const struct hvm_start_info *si)
{
	const struct hvm_memmap_entry *map;
	uint32_t i;

	if (si->magic != HVM_START_MAGIC || si->version < 1) {
		print_fatal("fatal: bad PVH start_info (magic 0x%x version %u)", si->magic,
			    si->version);
		halt_forever();
	}
	if (si->cmdline_paddr) {
		const char *s = (const char *)si->cmdline_paddr;
		for (i = 0; i < CMDLINE_MAX - 1 && s[i]; i++)
			boot.cmdline[i] = s[i];
		boot.cmdline[i] = 0;
	}
	boot.rsdp_paddr = si->rsdp_paddr;
	map = (const struct hvm_memmap_entry *)si->memmap_paddr;
	for (i = 0; i < si->memmap_entries && i < MAX_MEMMAP; i++) {
		boot.memmap[i] = map[i];
		if (map[i].type == E820_RAM)
			boot.ram_bytes += map[i].size;
	}
	boot.memmap_entries = i;
}

/*
 * Identity-map [0, max(4 GiB, end of RAM)) with 2 MiB pages, all with the
 * U bit so ring 3 can reach RAM and the LAPIC. The LAPIC's 2 MiB page is
 * uncached. Every entry of every table is written, as RAM may not be zero.
 */
static void build_page_tables(void)
{
	uint64_t ram_end = 4 * GiB, npd, npdpt, pml4, pdpt, pd, i;
	uint64_t *t;

	for (i = 0; i < boot.memmap_entries; i++)
		if (boot.memmap[i].type == E820_RAM)
			ram_end = max_u64(ram_end, boot.memmap[i].addr + boot.memmap[i].size);
	npd = align_up(ram_end, GiB) / GiB; /* one page directory per GiB */
	npdpt = align_up(npd, 512) / 512;   /* one PDPT per 512 GiB */
	if (npdpt > 512)
		npdpt = 512, npd = 512 * 512;

	pml4 = alloc_pages(PAGE_SIZE);
	pdpt = alloc_pages(npdpt * PAGE_SIZE);
	pd = alloc_pages(npd * PAGE_SIZE);

	t = (uint64_t *)pml4;
	for (i = 0; i < 512; i++)
		t[i] = i < npdpt ? (pdpt + i * PAGE_SIZE) | PTE_P | PTE_W | PTE_U : 0;
	t = (uint64_t *)pdpt;
	for (i = 0; i < npdpt * 512; i++)
		t[i] = i < npd ? (pd + i * PAGE_SIZE) | PTE_P | PTE_W | PTE_U : 0;
	t = (uint64_t *)pd;
	for (i = 0; i < npd * 512; i++) {
		uint64_t addr = i << 21;
		uint64_t flags = PTE_P | PTE_W | PTE_U | PTE_PS;
		if (addr == align_down(LAPIC_BASE, 2 * MiB))
			flags |= PTE_PCD | PTE_PWT;
		t[i] = addr | flags;
	}
	kernel_cr3 = pml4;
	write_cr3(pml4);
}

/*
 * SYS_MAP_UNCACHED (ring 0, from trap.c): map [addr, addr + len) uncached,
 * with 2 MiB pages, for a device's registers. The 64-bit BARs lie above
 * what build_page_tables() mapped; the missing PDPT and PD pages come from
 * `pages`, which ring 3 zeroed (it has room for a few). Returns how many it
 * used. Only the BSP drives devices, so only its TLB is flushed.
 */
uint64_t map_uncached(uint64_t addr, uint64_t len, uint64_t pages)
{
	uint64_t used = 0, p, *e;

	for (p = align_down(addr, 2 * MiB); p < addr + len; p += 2 * MiB) {
		e = (uint64_t *)kernel_cr3 + (p >> 39 & 511);
		if (!(*e & PTE_P))
			*e = (pages + PAGE_SIZE * used++) | PTE_P | PTE_W | PTE_U;
		e = (uint64_t *)(*e & PTE_ADDR) + (p >> 30 & 511);
		if (!(*e & PTE_P))
			*e = (pages + PAGE_SIZE * used++) | PTE_P | PTE_W | PTE_U;
		e = (uint64_t *)(*e & PTE_ADDR) + (p >> 21 & 511);
		*e = p | PTE_P | PTE_W | PTE_U | PTE_PS | PTE_PCD | PTE_PWT;
	}
	write_cr3(kernel_cr3);
	return used;
}

static void set_gate(unsigned vec, void (*handler)(void), unsigned dpl)
{
	uint64_t a = (uint64_t)handler;

	/* 64-bit interrupt gate (type 0xe), present, IF cleared on entry. */
	idt[2 * vec] = (a & 0xffff) | ((uint64_t)KERNEL_CS << 16) |
		       ((uint64_t)(0x8e | dpl << 5) << 40) | ((a >> 16 & 0xffff) << 48);
	idt[2 * vec + 1] = a >> 32;
}

static void build_idt(void)
{
	unsigned v;

	for (v = 0; v < 256; v++)
		set_gate(v, (void (*)(void))(isr_stubs + 16 * v), 0);
	set_gate(VEC_TIMER, timer_isr, 0);
	set_gate(VEC_WAKE, wake_isr, 0);
	set_gate(VEC_DISK, disk_isr, 0);
	set_gate(VEC_POWER, power_isr, 0);
	set_gate(VEC_SPURIOUS, spurious_isr, 0);
	/* Ring 3 may `int $0x80` (trap.c). */
	set_gate(VEC_SYSCALL, (void (*)(void))(isr_stubs + 16 * VEC_SYSCALL), 3);
}

/*
 * Busy-wait on the LAPIC timer, whose bus runs at 1 GHz: start a long
 * one-shot count (masked) and watch it go down, then stop it before it
 * expires. Letting it expire would race with the tick setup: KVM may act
 * on the expiry after the LVT has been unmasked and deliver a stray tick.
 */
void lapic_delay_us(uint32_t us)
{
	uint32_t ns = us < 4000000 ? us * 1000 : 4000000000u;
	uint32_t start;

	lapic_write(APIC_LVT_TIMER, APIC_LVT_MASKED | VEC_TIMER);
	lapic_write(APIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(APIC_TIMER_INIT, 0xffffffff);
	start = lapic_read(APIC_TIMER_CUR);
	while (start - lapic_read(APIC_TIMER_CUR) < ns)
		cpu_relax();
	lapic_write(APIC_TIMER_INIT, 0);
}

/*
 * Per-CPU ring-0 state: TSS (RSP0) and its GDT descriptor, the IDT, the
 * LAPIC. The word at RSP0 holds the struct cpu pointer for the handlers.
 */
_Static_assert(__builtin_offsetof(struct cpu, ticks) == CPU_TICKS, "isr.S");
_Static_assert(__builtin_offsetof(struct cpu, tick_tsc) == CPU_TICK_TSC, "isr.S");

/*
 * KVM's clock, for its PVCLOCK_GUEST_STOPPED flag (see struct pvclock): with
 * it, ferry.blackout tells the gap a migration's switchover caused from the
 * host merely preempting the vCPU.
 */
static bool kvm_clock_available(void)
{
	uint32_t r[4];

	cpuid(1, 0, r);
	if (!(r[2] & (1u << 31))) /* no hypervisor */
		return false;
	cpuid(KVM_CPUID_SIGNATURE, 0, r);
	/* "KVMKVMKVM\0\0\0" in EBX, ECX, EDX */
	if (r[1] != 0x4b4d564b || r[2] != 0x564b4d56 || r[3] != 0x4d)
		return false;
	cpuid(KVM_CPUID_FEATURES, 0, r);
	return r[0] & KVM_FEATURE_CLOCKSOURCE2;
}

void cpu_setup(struct cpu *c)
{
	uint64_t rsp0 = c->kstack_top - 16;
	uint64_t base = (uint64_t)&c->tss;
	uint64_t limit = sizeof(c->tss) - 1;
	unsigned slot = TSS_FIRST / 8 + 2 * c->index;

	*(uint64_t *)rsp0 = (uint64_t)c;
	c->tss.rsp0 = rsp0;
	c->tss.iomap_base = __builtin_offsetof(struct tss64, iomap);
	c->tss.iomap_end = 0xff; /* iomap[] is zero in the image: all open */

	/* 64-bit available TSS (type 9), present. */
	gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
		    ((limit >> 16 & 0xf) << 48) | ((base >> 24 & 0xff) << 56);
	gdt[slot + 1] = base >> 32;
	ltr(slot * 8);
	lidt(idt, sizeof(idt) - 1);
	/* The timer handler finds its struct cpu through GS, in ring 3 and 0 alike. */
	wrmsr(MSR_GS_BASE, (uint64_t)c);

	/* Software-enable the LAPIC; spurious vector 0xff. */
	lapic_write(APIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_write(APIC_TPR, 0);
	lapic_write(APIC_LVT_LINT0, APIC_LVT_MASKED); /* no 8259 ExtINT */
	lapic_write(APIC_LVT_ERROR, APIC_LVT_MASKED);
	c->apic_id = lapic_read(APIC_ID) >> 24;
}

/*
 * SYS_KVM_CLOCK (ring 0, from trap.c): registers the calling CPU's clock
 * page with KVM. Only ferry.blackout asks: KVM writes the page, in guest RAM,
 * whenever it updates the clock, also on a migration's destination before
 * the guest runs there.
 */
void kvm_clock_register(void)
{
	/* cpu_setup() put this CPU's struct cpu in GS base. */
	struct cpu *c = (struct cpu *)rdmsr(MSR_GS_BASE);

	/* Bit 0 enables; the guest's addresses are physical ones (identity map). */
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)&c->clock | 1);
}

/*
 * Each CPU's ring-0 stack, then its ring-3 stack, CPU after CPU in index
 * order: this_cpu() in user.c finds a CPU from %rsp that way.
 */
static void alloc_stacks(struct cpu *c)
{
	c->kstack_top = alloc_pages(KSTACK_SIZE) + KSTACK_SIZE;
	c->ustack_top = alloc_pages(USTACK_SIZE) + USTACK_SIZE;
	ap_stack_top[c->index] = c->kstack_top - 16;
}

/*
 * IOAPIC pin 23, where ferry's ACPI Generic Event Device signals the power
 * button (its _CRS: level, active high), to VEC_POWER on this CPU. Linux
 * learns the pin from the DSDT; this guest reads no AML and knows it. A
 * press made before this (the line already high) arrives once it is set.
 */
#define IOAPIC_BASE 0xfec00000
#define IOAPIC_REDIRECTION(pin) (0x10 + 2 * (pin))
#define IOAPIC_LEVEL (1u << 15)
#define POWER_BUTTON_PIN 23

static void ioapic_write(uint32_t reg, uint32_t value)
{
	*(volatile uint32_t *)(uint64_t)IOAPIC_BASE = reg;
	*(volatile uint32_t *)(uint64_t)(IOAPIC_BASE + 0x10) = value;
}

static void route_power_button(const struct cpu *c)
{
	/* Fixed delivery, physical destination, level, active high, unmasked. */
	ioapic_write(IOAPIC_REDIRECTION(POWER_BUTTON_PIN) + 1, c->apic_id << 24);
	ioapic_write(IOAPIC_REDIRECTION(POWER_BUTTON_PIN), IOAPIC_LEVEL | VEC_POWER);
}

void bsp_main(uint32_t start_info)
{
	struct cpu *c = &cpus[0];
	uint32_t i, n;

	alloc_next = align_up((uint64_t)image_end, PAGE_SIZE);
	read_start_info((const struct hvm_start_info *)(uint64_t)start_info);
	build_page_tables();
	build_idt();

	/* Mask both 8259 PICs: firmware (SeaBIOS) may have left IRQ0 on. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);

	c->index = 0;
	alloc_stacks(c);
	boot.kvm_clock = kvm_clock_available();
	cpu_setup(c);
	route_power_button(c);
	c->online = 1;

	/*
	 * Stacks for every CPU index an AP may take, then the APs. With no MP
	 * table we do not know how many will come, so provide for the most.
	 */
	boot.expected_cpus = find_cpus();
	n = boot.expected_cpus ? boot.expected_cpus : MAX_CPUS;
	for (i = 1; i < n; i++) {
		cpus[i].index = i;
		alloc_stacks(&cpus[i]);
	}
	ap_max_index = n - 1; /* x86 keeps these stores ordered before the IPIs */
	start_aps();

	boot.free_start = max_u64(4 * MiB, align_up(alloc_next, 2 * MiB));
	enter_user(user_main, c->ustack_top - 8, c);
}

void ap_main(uint32_t index)
{
	struct cpu *c = &cpus[index];

	cpu_setup(c);
	__atomic_store_n(&c->online, 1, __ATOMIC_RELEASE);

	/*
	 * Sleep until the BSP has printed `ready`: a halted vCPU leaves the
	 * host's cores to the BSP, which matters with many vCPUs on few
	 * cores. `sti; hlt` takes the wake-up IPI only once halted, so it
	 * cannot slip in between the test of `go` and the hlt.
	 */
	while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	enter_user(user_main, c->ustack_top - 8, c);
}
