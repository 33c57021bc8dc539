/*
 * ferry-guest: the built-in test guest of the ferry VMM.
 *
 * Declarations shared by the C and assembler sources. The guest boots
 * through PVH (entry.S), sets the machine up in ring 0 (setup.c, smp.c),
 * then every CPU drops to ring 3 and runs the workloads (user.c). See
 * README.md for the overall picture.
 *
 * Under this project's KVM (PVM), ring-0 and real-mode code is emulated
 * instruction by instruction (~2 M instructions/s) while ring-3 code runs
 * natively. So ring 0 does as little as possible and the hot loops live in
 * ring 3. Ring-0 code must also avoid the instructions KVM's emulator lacks
 * (int3, ud2, popcnt, xsave, cmpxchg16b, fwait, clac/stac, SSE); build.rs
 * scans the linked image for them.
 */
#ifndef FERRY_GUEST_H
#define FERRY_GUEST_H

/* xAPIC IDs are 8 bits and 0xff is the broadcast ID. */
#define MAX_CPUS 255
/* A CPU's share of free RAM may straddle holes in the memory map. */
#define MAX_SLICES 4
/* Entries of the PVH memory map we keep. */
#define MAX_MEMMAP 64
#define CMDLINE_MAX 1024

#define PAGE_SIZE 4096

/* GDT layout (entry.S): six fixed descriptors, then one 16-byte TSS per CPU. */
#define KERNEL_CS 0x08   /* ring 0, 64-bit */
#define KERNEL_DS 0x10   /* ring 0 */
#define USER_DS 0x1b     /* index 3, RPL 3 */
#define USER_CS 0x23     /* index 4, RPL 3, 64-bit */
#define KERNEL_CS32 0x28 /* ring 0, 32-bit: boot and AP trampoline */
#define TSS_FIRST 0x30
#define GDT_ENTRIES (6 + 2 * MAX_CPUS)

/* Interrupt vectors. */
#define VEC_TIMER 0x20
#define VEC_WAKE 0x21 /* BSP -> APs: `go` is set */
#define VEC_DISK 0x30 /* virtio-blk queue 0, MSI-X entry 0, to the BSP */
#define VEC_POWER 0x31 /* ACPI power button (IOAPIC pin 23), to the BSP */
#define GED_EVENT_PORT 0x602 /* ferry's ACPI event register: bit 0, a press */
#define VEC_SYSCALL 0x80 /* `int $0x80` from ring 3, request in %rdi */
#define VEC_SPURIOUS 0xff

/* Requests ring 3 can make with `int $0x80`. */
#define SYS_TRIPLE_FAULT 1
#define SYS_MAP_UNCACHED 2 /* %rsi addr, %rdx len, %rcx zeroed pages; %rax = pages used */
#define SYS_IDLE 3	   /* halt until the next interrupt */
#define SYS_KVM_CLOCK 4	   /* register the calling CPU's clock page with KVM */

/* Offsets in struct cpu that isr.S uses. */
#define CPU_TICKS 0
#define CPU_TICK_TSC 8

/* Per-CPU stacks, allocated by the BSP just after the image. */
#define KSTACK_SIZE 8192
#define USTACK_SIZE 16384

/* The AP trampoline is copied here: SIPI vector 0x10 starts APs at 1000:0000. */
#define TRAMPOLINE_BASE 0x10000
#define SIPI_VECTOR (TRAMPOLINE_BASE >> 12)

#define LAPIC_BASE 0xfee00000

/* Control registers and MSRs for entering long mode. */
#define CR0_VALUE 0x80050033 /* PG | AM | WP | NE | ET | MP | PE, as Linux */
#define CR4_PAE (1 << 5)
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)

/* Bit 31 of ap_arrival: the BSP stopped counting arrivals. */
#define AP_DOOR_CLOSED 0x80000000

#ifndef __ASSEMBLER__

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef long int64_t;
typedef unsigned long size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define MiB (1UL << 20)
#define GiB (1UL << 30)

struct slice {
	uint64_t start, end; /* [start, end), page aligned */
};

/*
 * Ports 0..IOMAP_PORTS-1 are open to ring 3 through the TSS I/O bitmap: the
 * serial port, the i8042 and PCI configuration space (0xcf8..0xcff).
 */
#define IOMAP_PORTS 0xd00

/*
 * The 64-bit TSS: RSP0 (interrupts from ring 3 switch to it) and an I/O
 * permission bitmap. Ring 3 runs with IOPL=3, which alone lets it use
 * in/out; but PVM drops IOPL on iretq, and then KVM's emulator falls back
 * to this bitmap (a zero bit allows the port; ports past the end do not).
 */
struct tss64 {
	uint32_t reserved0;
	uint64_t rsp0, rsp1, rsp2;
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
	uint8_t iomap[IOMAP_PORTS / 8];
	uint8_t iomap_end; /* must be 0xff */
} __attribute__((packed));

#define RECENT_GAPS 4 /* blackout: gaps kept for a stop flag seen late */

/*
 * KVM's per-CPU clock page (struct pvclock_vcpu_time_info), which KVM
 * writes. The guest reads the time from the TSC; it wants the flags, which
 * say when the VMM stopped the vCPU (a pause, a migration's switchover).
 */
struct pvclock {
	uint32_t version;
	uint32_t pad0;
	uint64_t tsc_timestamp;
	uint64_t system_time;
	uint32_t tsc_to_system_mul;
	signed char tsc_shift;
	uint8_t flags;
	uint8_t pad[2];
} __attribute__((aligned(32))); /* KVM wants it within one page */

/*
 * One per CPU. `ticks` must stay first: the timer handler in isr.S finds
 * this structure through a pointer stored at the top of the CPU's ring-0
 * stack and increments the word it points at.
 */
struct cpu {
	volatile uint64_t ticks; /* written by the ring-0 timer handler only */
	volatile uint64_t tick_tsc; /* TSC at the last tick, also from the handler */
	uint32_t index;		 /* 0 = BSP, then APs in order of arrival */
	uint32_t apic_id;
	volatile uint32_t online; /* ring-0 setup of this CPU is done */
	uint32_t nslices;
	uint64_t kstack_top; /* ring-0 stack; RSP0 is 16 bytes below */
	uint64_t ustack_top; /* ring-3 stack */
	struct slice slices[MAX_SLICES];
	uint64_t ticks_printed; /* ring-3 bookkeeping from here on */
	uint64_t sweeps;
	uint64_t pages_since_poll;
	uint64_t last_tsc;
	uint64_t pace_next;   /* dirty_mbps: TSC at which the next page may be written */
	uint64_t pace_frac;   /* ... and its fraction, in 1/65536 cycles */
	uint64_t gap_last;    /* blackout: the last TSC reading, 0 = not tracking yet */
	uint64_t gap_pending; /* blackout: largest gap not yet reported, in cycles */
	uint64_t gap_pending_end; /* ... and the TSC when it ended */
	uint64_t stop_gap;    /* blackout: the gap across the last host stop, in cycles */
	uint64_t stop_gap_end; /* ... and the TSC when it ended */
	bool stop_pending;    /* ... not yet reported */
	struct {
		uint64_t cycles, end; /* TSC when it ended */
	} recent[RECENT_GAPS];	      /* blackout: the last gaps, for a late stop flag */
	uint32_t recent_next;
	uint64_t idle_tick;   /* ferry.idle=hlt: the tick whose TSC idle_tsc holds */
	uint64_t idle_tsc;
	struct tss64 tss __attribute__((aligned(16)));
	struct pvclock clock; /* KVM's clock for this CPU (registered for ferry.blackout) */
} __attribute__((aligned(64)));

/* Memory map entry of struct hvm_start_info (xen/arch-x86/hvm/start_info.h). */
struct hvm_memmap_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type; /* 1 = RAM */
	uint32_t reserved;
};
#define E820_RAM 1

/* Settings from the command line (cmdline.c). */
#define RUN_TICK (1u << 0)
#define RUN_SWEEP (1u << 1)
#define RUN_TSC (1u << 2)
#define RUN_RESET (1u << 3)
#define RUN_TRIPLEFAULT (1u << 4)
#define RUN_ECHO (1u << 5)
#define RUN_DISK (1u << 6)
#define RUN_POWEROFF (1u << 7)
#define RUN_DEFAULT (RUN_TICK | RUN_SWEEP | RUN_TSC)

struct config {
	uint32_t run;	     /* RUN_* bits */
	uint64_t tick_ms;    /* LAPIC timer period */
	uint64_t sweep_mb;   /* cap on each CPU's slices, 0 = none */
	uint64_t fill_pct;   /* share of free RAM filled once at boot, 0..100 */
	uint64_t dirty_mbps; /* sweep pace, MiB/s over all CPUs, 0 = unlimited */
	uint64_t blackout_ms; /* report TSC gaps longer than this, 0 = off */
	uint64_t disk_blocks; /* 4 KiB blocks the disk workload uses, 0 = default */
	bool idle_hlt;	      /* ferry.idle=hlt: an idle CPU halts between ticks */
};

/* Everything ring 3 needs to know, filled in by ring 0 (setup.c, smp.c). */
struct boot {
	char cmdline[CMDLINE_MAX];
	struct hvm_memmap_entry memmap[MAX_MEMMAP];
	uint32_t memmap_entries;
	uint32_t expected_cpus; /* from ACPI or the MP table, 0 if neither */
	uint64_t rsdp_paddr;	/* from hvm_start_info, may be 0 */
	uint16_t sleep_port;	/* the FADT's sleep control register (I/O), 0 if none */
	uint64_t ram_bytes;	/* sum of the RAM entries */
	uint64_t free_start;	/* first byte the guest itself does not use */
	uint32_t ncpus;		/* CPUs that came online (set in ring 3) */
	struct config cfg;	/* parsed in ring 3 */
	uint64_t tsc_khz;	/* measured if dirty_mbps or blackout asks, else 0 */
	uint64_t pace_fp;	/* dirty_mbps: TSC cycles per page, 16.16 fixed point */
	uint64_t pace_slack;	/* dirty_mbps: lag (cycles) beyond which no catching up */
	uint64_t gap_cycles;	/* blackout: threshold in TSC cycles, 0 = off */
	uint64_t gap_floor_cycles; /* blackout: GAP_FLOOR_US in TSC cycles */
	uint64_t stop_lag_cycles;  /* blackout: STOP_FLAG_LAG_US in TSC cycles */
	bool kvm_clock;		/* KVM's clock is there (CPUID); ferry.blackout registers it */
};

extern struct boot boot;
extern struct cpu cpus[MAX_CPUS];

/* entry.S */
extern volatile uint32_t go; /* set by the BSP after `ready` */
extern uint64_t kernel_cr3;
extern uint64_t ap_stack_top[MAX_CPUS];
extern volatile uint32_t ap_arrival;
extern uint32_t ap_max_index;
extern uint64_t gdt[GDT_ENTRIES];
extern char trampoline_start[], trampoline_end[];
extern char image_end[];
void enter_user(void (*entry)(struct cpu *), uint64_t rsp, struct cpu *arg)
	__attribute__((noreturn));

/* isr.S */
extern char isr_stubs[]; /* 256 stubs, 16 bytes apart */
void timer_isr(void);
void spurious_isr(void);
void wake_isr(void);
void disk_isr(void);
void power_isr(void);

/* setup.c */
void cpu_setup(struct cpu *c);
void kvm_clock_register(void);
void lapic_delay_us(uint32_t us);
void halt_forever(void) __attribute__((noreturn));
uint64_t map_uncached(uint64_t addr, uint64_t len, uint64_t pages);

/* smp.c */
uint32_t find_cpus(void); /* also finds boot.sleep_port */
void start_aps(void);

/* cmdline.c */
void parse_cmdline(const char *cmdline, struct config *cfg);

/* print.c: usable from ring 0 and ring 3 (IOPL=3). One call prints one line. */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void print_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* user.c */
void user_main(struct cpu *c) __attribute__((noreturn));
void gap_note(void); /* blackout: a TSC reading on this CPU (print.c calls it) */

/* disk.c: the disk workload (BSP only) */
#define DISK_MEM_BYTES (28 * PAGE_SIZE) /* RAM it needs (disk.h: DMEM_PAGES), reserved before fill and slices */
extern volatile uint64_t disk_irqs; /* written by disk_isr only */
extern volatile uint64_t power_presses; /* written by power_isr only */
void disk_setup(uint64_t mem);
void disk_poll(void);

static inline uint64_t align_up(uint64_t x, uint64_t a)
{
	return (x + a - 1) & ~(a - 1);
}

static inline uint64_t align_down(uint64_t x, uint64_t a)
{
	return x & ~(a - 1);
}

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static inline uint64_t max_u64(uint64_t a, uint64_t b)
{
	return a > b ? a : b;
}

#endif /* __ASSEMBLER__ */
#endif
