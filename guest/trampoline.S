/*
 * The AP trampoline: real mode -> protected mode -> long mode.
 *
 * An AP starts at 1000:0000 after the startup IPI, so smp.c copies this
 * code to TRAMPOLINE_BASE (0x10000) first. It runs in place there, so it
 * addresses its own bytes by their offset from trampoline_start; anything
 * in the image (GDT, kernel_cr3, ap_long64) is reached by absolute address
 * once protected mode is on. It uses no stack.
 */
#include "guest.h"

#define REL(sym) ((sym) - trampoline_start)

	.section .rodata.trampoline, "a"
	.code16
	.globl trampoline_start, trampoline_end
trampoline_start:
	cli
	cld
	mov %cs, %ax
	mov %ax, %ds
	lgdtl REL(tramp_gdt_ptr)
	mov %cr0, %eax
	or $1, %eax			/* PE */
	mov %eax, %cr0
	ljmpl $KERNEL_CS32, $(TRAMPOLINE_BASE + REL(tramp32))

	.code32
tramp32:
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov kernel_cr3, %eax		/* the BSP's final page tables */
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov $CR0_VALUE, %eax
	mov %eax, %cr0
	ljmp $KERNEL_CS, $ap_long64

	.balign 8
tramp_gdt_ptr:			/* lgdtl in real mode reads a 32-bit base */
	.word GDT_ENTRIES * 8 - 1
	.long gdt
trampoline_end:
