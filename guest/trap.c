/*
 * The common interrupt/exception handler (ring 0), reached from the stubs
 * in isr.S. It serves the requests ring 3 makes with `int $0x80`; any other
 * exception is a bug in the guest: say where, and stop this CPU. A stray
 * device interrupt is acknowledged and otherwise ignored.
 */
#include "guest.h"
#include "x86.h"

struct trap_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

#define VEC_UD 6
#define VEC_GP 13

/*
 * SYS_TRIPLE_FAULT: load an empty IDT and divide by zero. The #DE cannot
 * be delivered, nor the #GP that causes, nor the #DF: the CPU shuts down.
 * A divide error rather than int3/ud2, because KVM's emulator (which runs
 * this code under PVM) implements div but not those.
 */
static void triple_fault(void)
{
	uint32_t lo = 1, hi = 0, zero = 0;

	lidt(NULL, 0);
	__asm__ volatile("divl %2" : "+a"(lo), "+d"(hi) : "r"(zero));
}

/*
 * Is this an `int $0x80` from ring 3? On hardware and under QEMU it
 * arrives as vector 0x80 with RIP after the instruction. Under PVM a
 * software interrupt from ring 3 is not delivered as such: it arrives as
 * #UD (or #GP) with RIP at the instruction, so recognise its two bytes.
 */
static bool is_syscall(struct trap_frame *f)
{
	const uint8_t *ip = (const uint8_t *)f->rip;

	if (f->vector == VEC_SYSCALL)
		return true;
	if ((f->cs & 3) == 3 && (f->vector == VEC_UD || f->vector == VEC_GP) && ip[0] == 0xcd &&
	    ip[1] == VEC_SYSCALL) {
		f->rip += 2; /* return past it, as a real int would */
		return true;
	}
	return false;
}

void trap(struct trap_frame *f)
{
	if (is_syscall(f)) {
		if (f->rdi == SYS_TRIPLE_FAULT)
			triple_fault();
		else if (f->rdi == SYS_MAP_UNCACHED)
			f->rax = map_uncached(f->rsi, f->rdx, f->rcx);
		else if (f->rdi == SYS_KVM_CLOCK)
			kvm_clock_register();
		else if (f->rdi == SYS_IDLE)
			/* The interrupt that ends the halt is taken here, in ring 0. */
			__asm__ volatile("sti; hlt; cli" ::: "memory");
		return;
	}
	if (f->vector < 32) {
		print_fatal("fatal: exception vector=%lu error=0x%lx rip=0x%lx cs=0x%lx "
			    "rflags=0x%lx rsp=0x%lx cr2=0x%lx apic=%u",
			    f->vector, f->error, f->rip, f->cs, f->rflags, f->rsp, read_cr2(),
			    lapic_read(APIC_ID) >> 24);
		halt_forever();
	}
	lapic_write(APIC_EOI, 0);
}
