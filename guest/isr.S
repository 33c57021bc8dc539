/*
 * Interrupt and exception entry points.
 *
 * Apart from the wake-up IPI, interrupts only ever arrive while a CPU is in
 * ring 3 (ring 0 otherwise runs with IF=0), so the handlers start on the
 * CPU's RSP0 stack, whose top word holds the CPU's struct cpu pointer (see
 * cpu_setup()).
 *
 * Handlers run in ring 0, i.e. emulated under PVM: the timer handler is a
 * handful of instructions and never prints (ring 3 may hold the serial lock).
 */
#include "guest.h"

	.text
	.code64

/*
 * LAPIC timer: ticks++ of this CPU and the TSC of the tick, then EOI. GS
 * points at this CPU's struct cpu (cpu_setup()), whose first words are the
 * tick counter and the tick's TSC, so this works whether the tick arrives
 * in ring 3 or in the ring-0 halt of SYS_IDLE.
 */
	.globl timer_isr
timer_isr:
	push %rax
	push %rdx
	incq %gs:CPU_TICKS
	rdtsc
	shl $32, %rdx
	or %rdx, %rax
	mov %rax, %gs:CPU_TICK_TSC
	mov $(LAPIC_BASE + 0xb0), %eax	/* EOI register (zero-extended) */
	movl $0, (%rax)
	pop %rdx
	pop %rax
	iretq

/*
 * The wake-up IPI: its only job is to end the AP's `hlt` in ap_main(). It
 * arrives in ring 0, on whatever stack the AP is using.
 */
	.globl wake_isr
wake_isr:
	push %rax
	mov $(LAPIC_BASE + 0xb0), %eax
	movl $0, (%rax)
	pop %rax
	iretq

/*
 * virtio-blk completion (MSI-X entry 0, sent to the BSP only): count it
 * for the `irqs=` of the disk lines, then EOI. Ring 3 polls the used ring;
 * the interrupt only proves that the device's MSI-X path works.
 */
	.globl disk_isr
disk_isr:
	push %rax
	incq disk_irqs(%rip)
	mov $(LAPIC_BASE + 0xb0), %eax
	movl $0, (%rax)
	pop %rax
	iretq

/*
 * The ACPI power button (ferry's Generic Event Device, a level interrupt on
 * IOAPIC pin 23, sent to the BSP). As the device's _EVT does for Linux: read
 * the event register and write the press back, which drops the line, before
 * the EOI (a line still high would interrupt again at once). Ring 3 sees the
 * count and powers off.
 */
	.globl power_isr
power_isr:
	push %rax
	push %rdx
	mov $GED_EVENT_PORT, %dx
	inb %dx, %al
	test $1, %al
	jz 1f
	incq power_presses(%rip)
	outb %al, %dx
1:	mov $(LAPIC_BASE + 0xb0), %eax
	movl $0, (%rax)
	pop %rdx
	pop %rax
	iretq

/* Spurious LAPIC interrupts need no EOI. */
	.globl spurious_isr
spurious_isr:
	iretq

/*
 * One 16-byte stub per vector for everything else: push a dummy error code
 * where the CPU pushes none, push the vector, go to trap_common, which
 * calls trap() in trap.c with a struct trap_frame. This includes the
 * `int $0x80` requests from ring 3.
 */
	.balign 16
	.globl isr_stubs
isr_stubs:
	vector = 0
	.rept 256
	.balign 16
	.if !(vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 || vector == 29 || vector == 30)
	pushq $0
	.endif
	pushq $vector
	jmp trap_common
	vector = vector + 1
	.endr

trap_common:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	call trap
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp			/* vector and error code */
	iretq
