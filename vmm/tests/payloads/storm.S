/* A hostile guest: a seeded storm of garbage against every virtio-mmio window and the
 * I/O ports. Each round picks one of: a random register write, a random register read,
 * a device set-up with random features and random queue sizes and addresses (then
 * DRIVER_OK), a page of random descriptors / rings in the arena the queues point at
 * (looping, out-of-range, huge, zero-length and indirect chains, available indexes
 * anywhere), a burst of 64 queue notifications, interrupt acknowledgements, or a random
 * port write or read.
 *
 * The command line chooses: its bytes seed the generator (so each case is another
 * storm); a `!` anywhere in it storms forever (the host must still stop it; the shim
 * appends an `io.kestrel.vm.cmdline` annotation to its own command line), else the
 * storm lasts ROUNDS rounds, prints "storm done" and exits with status 7.
 *
 * Ports the storm leaves alone: the exit port and boot timer (0x440-0x447) and the
 * i8042 (0x60-0x64, whose 0xfe resets the machine) — those end the VM on purpose. */
#include "common.S"

#define MMIO_BASE 0xd0000000
#define WINDOWS 4
#define ARENA 0x1000000          /* 16 MiB of guest RAM: queues and descriptors */
#define ARENA_MASK 0x00fffff0
#define ROUNDS 4000

    .globl _start
_start:
    mov $0x80000, %esp
    mov 0x18(%ebx), %esi           /* cmdline_paddr */
    mov $2463534242, %edi
1:  movzbl (%esi), %eax
    test %eax, %eax
    jz 2f
    cmp $'!', %eax
    jne 4f
    movl $1, forever
4:  imul $31, %edi
    add %eax, %edi
    inc %esi
    jmp 1b
2:  test %edi, %edi
    jnz 3f
    mov $1, %edi
3:  mov %edi, seed
    PRINT(m_start)
    movl $ROUNDS, left

round:
    call rand
    and $7, %eax
    jmp *table(,%eax,4)

next:
    cmpl $0, forever
    jne round
    decl left
    jnz round
    PRINT(m_done)
    mov $7, %al
    jmp exit_with

/* rand: eax = next xorshift32 value */
rand:
    mov seed, %eax
    mov %eax, %edx
    shl $13, %edx
    xor %edx, %eax
    mov %eax, %edx
    shr $17, %edx
    xor %edx, %eax
    mov %eax, %edx
    shl $5, %edx
    xor %edx, %eax
    mov %eax, seed
    ret

/* window: ebx = a random virtio-mmio window's base */
window:
    call rand
    xor %edx, %edx
    mov $WINDOWS, %ecx
    div %ecx
    mov %edx, %ebx
    shl $12, %ebx
    add $MMIO_BASE, %ebx
    ret

/* arena_addr: eax = a random 16-byte aligned address in the arena */
arena_addr:
    call rand
    and $ARENA_MASK, %eax
    add $ARENA, %eax
    ret

act_write:
    call window
    call rand
    and $0x1fc, %eax
    add %eax, %ebx
    call rand
    mov %eax, (%ebx)
    jmp next

act_read:
    call window
    call rand
    and $0x1fc, %eax
    add %eax, %ebx
    mov (%ebx), %eax
    jmp next

act_setup:
    call window
    movl $0, 0x70(%ebx)            /* reset */
    movl $3, 0x70(%ebx)            /* ACKNOWLEDGE | DRIVER */
    movl $0, 0x24(%ebx)
    call rand
    mov %eax, 0x20(%ebx)           /* features 0-31: anything */
    movl $1, 0x24(%ebx)
    call rand
    or $1, %eax                    /* VERSION_1, mostly with garbage */
    mov %eax, 0x20(%ebx)
    movl $0xb, 0x70(%ebx)          /* FEATURES_OK */
    xor %esi, %esi
1:  mov %esi, 0x30(%ebx)           /* QueueSel */
    call rand
    and $0x1ff, %eax               /* 0 .. 511: zero, odd, too big */
    mov %eax, 0x38(%ebx)
    call arena_addr
    mov %eax, 0x80(%ebx)
    movl $0, 0x84(%ebx)
    call arena_addr
    mov %eax, 0x90(%ebx)
    movl $0, 0x94(%ebx)
    call arena_addr
    mov %eax, 0xa0(%ebx)
    call rand
    and $1, %eax                   /* now and then a used ring above 4 GiB */
    mov %eax, 0xa4(%ebx)
    movl $1, 0x44(%ebx)            /* QueueReady */
    inc %esi
    cmp $3, %esi
    jne 1b
    movl $0xf, 0x70(%ebx)          /* DRIVER_OK */
    jmp next

/* A page of descriptor-shaped garbage: addresses in the arena (so the device's writes
 * stay there), random lengths, flags and next indexes. */
act_fill:
    call arena_addr
    and $0xfffff000, %eax
    mov %eax, %edi
    mov $256, %esi
1:  call arena_addr
    mov %eax, (%edi)               /* addr low */
    movl $0, 4(%edi)               /* addr high */
    call rand
    test $0x100, %eax
    jz 2f
    and $0xffff, %eax              /* mostly small lengths, some huge */
2:  mov %eax, 8(%edi)              /* len */
    call rand
    and $0x001f0007, %eax          /* NEXT/WRITE/INDIRECT, next index 0..31 */
    mov %eax, 12(%edi)
    add $16, %edi
    dec %esi
    jnz 1b
    jmp next

act_notify:
    call window
    mov $64, %esi
1:  call rand
    and $3, %eax
    mov %eax, 0x50(%ebx)
    dec %esi
    jnz 1b
    jmp next

act_irq:
    call window
    mov 0x60(%ebx), %eax
    call rand
    mov %eax, 0x64(%ebx)
    mov 0xfc(%ebx), %eax           /* ConfigGeneration */
    jmp next

act_port:
    call rand
    mov %eax, %ecx
    and $0xffff, %eax
    mov %eax, %edx
    and $0xfff8, %eax
    cmp $0x440, %eax               /* exit port and boot timer */
    je next
    cmp $0x60, %edx
    jb 1f
    cmp $0x64, %edx
    jbe next                       /* i8042 */
1:  mov %ecx, %eax
    shr $16, %eax
    test $1, %eax
    jz 2f
    out %al, (%dx)
    jmp next
2:  in (%dx), %al
    jmp next

    .section .rodata
    .p2align 2
table:
    .long act_write, act_read, act_setup, act_fill, act_notify, act_irq, act_port, act_fill
m_start: .asciz "storm\n"
m_done: .asciz "storm done\n"

    .section .data
    .p2align 2
seed: .long 0
left: .long 0
forever: .long 0
