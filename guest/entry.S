/*
 * Boot entry of ferry-guest: PVH note, 32-bit entry, the switch to long
 * mode, the GDT, and the ring-0 -> ring-3 drop.
 *
 * PVH (the Xen "direct boot" protocol, also used by QEMU and Cloud
 * Hypervisor) enters at the address of the XEN_ELFNOTE_PHYS32_ENTRY note in
 * 32-bit protected mode, paging off, flat 4 GiB segments, with %ebx holding
 * the physical address of struct hvm_start_info.
 *
 * Everything here runs in ring 0 and is emulated under PVM, so the boot
 * page tables below are built by the assembler, not by a loop.
 */
#include "guest.h"

/* ---- PVH note --------------------------------------------------------- */

/*
 * An ELF note {namesz, descsz, type, "Xen\0", entry}. The descriptor is 8
 * bytes: QEMU reads a full 64-bit word from ELF64 images (only the low 32
 * bits count). The section is 4-byte aligned, as loaders expect of notes.
 */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4			/* namesz */
	.long 8			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_entry

/* ---- 32-bit entry (BSP) ----------------------------------------------- */

	.section .text.boot, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	mov %ebx, start_info_paddr	/* read by bsp_main() */

	/* Our own GDT: the loader's may be anywhere, even gone. */
	lgdt gdt_ptr
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov $boot_stack_top, %esp

	/* Long mode: PAE, boot page tables, EFER.LME, then paging. */
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov $boot_pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov $CR0_VALUE, %eax
	mov %eax, %cr0
	ljmp $KERNEL_CS, $bsp_long64

/* ---- 64-bit entries ---------------------------------------------------- */

	.code64
	.text
bsp_long64:
	mov $boot_stack_top, %rsp
	mov start_info_paddr, %edi
	call bsp_main
	/* bsp_main() does not return; if it did, stop here. */
	jmp halt_forever

/*
 * The APs arrive here from trampoline.S, in long mode on the final page
 * tables, with no stack yet. Each takes the next CPU index with a
 * compare-and-swap on ap_arrival, unless the BSP closed the door (it gave
 * up waiting) or there is no stack for that index; such an AP parks.
 */
	.globl ap_long64
ap_long64:
1:	mov ap_arrival, %eax
	test $AP_DOOR_CLOSED, %eax
	jnz ap_park
	cmp ap_max_index, %eax
	jae ap_park
	lea 1(%rax), %edx
	lock cmpxchg %edx, ap_arrival
	jne 1b
	mov %edx, %edi			/* our CPU index */
	mov ap_stack_top(,%rdi,8), %rsp
	call ap_main			/* does not return */
ap_park:
	cli
	hlt
	jmp ap_park

/*
 * enter_user(entry, rsp, arg): drop to ring 3 at entry(arg) on stack rsp,
 * with IF=1 (interrupts on) and IOPL=3 (ring 3 may use in/out).
 */
	.globl enter_user
enter_user:
	mov $USER_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	pushq $USER_DS			/* SS */
	pushq %rsi			/* RSP */
	pushq $0x3202			/* RFLAGS: IOPL=3, IF, reserved bit 1 */
	pushq $USER_CS			/* CS */
	pushq %rdi			/* RIP */
	mov %rdx, %rdi
	iretq

/* ---- data -------------------------------------------------------------- */

	.data
	.balign 8
	.globl kernel_cr3, ap_arrival, ap_max_index, ap_stack_top
start_info_paddr:
	.long 0
ap_arrival:			/* APs that took an index; AP_DOOR_CLOSED bit */
	.long 0
ap_max_index:			/* highest index with a stack (set by the BSP) */
	.long 0
	.balign 8
kernel_cr3:			/* the final page tables, loaded by the APs */
	.quad 0
ap_stack_top:			/* initial ring-0 %rsp of each CPU index */
	.fill MAX_CPUS, 8, 0

/*
 * The GDT. Accessed bits are preset so the CPU need not write them back.
 * TSS descriptors are filled in by cpu_setup().
 */
	.balign 16
	.globl gdt
gdt:
	.quad 0				/* null */
	.quad 0x00af9b000000ffff	/* 0x08 ring-0 code, 64-bit */
	.quad 0x00cf93000000ffff	/* 0x10 ring-0 data */
	.quad 0x00cff3000000ffff	/* 0x18 ring-3 data */
	.quad 0x00affb000000ffff	/* 0x20 ring-3 code, 64-bit */
	.quad 0x00cf9b000000ffff	/* 0x28 ring-0 code, 32-bit */
	.fill 2 * MAX_CPUS, 8, 0	/* 0x30 + 16*i: TSS of CPU i */
gdt_ptr:
	.word GDT_ENTRIES * 8 - 1
	.quad gdt

/*
 * Boot page tables: the first 1 GiB identity-mapped with 2 MiB pages, as
 * much as the C setup code needs before it builds the real tables.
 */
	.balign 4096
boot_pml4:
	.quad boot_pdpt + 0x3		/* present, writable */
	.fill 511, 8, 0
boot_pdpt:
	.quad boot_pd + 0x3
	.fill 511, 8, 0
boot_pd:
	addr = 0
	.rept 512
	.quad addr + 0x83		/* present, writable, 2 MiB page */
	addr = addr + 0x200000
	.endr

/* The BSP's stack until it drops to ring 3; not part of the file. */
	.section .stack, "aw", @nobits
	.balign 16
	.skip 16384
boot_stack_top:
