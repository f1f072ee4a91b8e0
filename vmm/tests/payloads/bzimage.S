/* A minimal bzImage: one setup sector with the boot header, then the protected-mode part
 * (loaded at 1 MiB) whose 64-bit entry sits at offset 0x200. Linked as a flat binary. */
    .text
    .org 0x1f1
    .byte 1                        /* setup_sects */
    .org 0x1fe
    .word 0xaa55                   /* boot_flag */
    .word 0                        /* jump */
    .ascii "HdrS"
    .word 0x020f                   /* protocol version */
    .org 0x211
    .byte 0x01                     /* loadflags: LOADED_HIGH */
    .org 0x214
    .long 0x100000                 /* code32_start */
    .org 0x22c
    .long 0x7fffffff               /* initrd_addr_max */
    .long 0x200000                 /* kernel_alignment */
    .org 0x236
    .word 0x1                      /* xloadflags: XLF_KERNEL_64 */
    .org 0x400                     /* end of setup: the protected-mode part starts here */
    .org 0x600                     /* its 64-bit entry point */
#include "long64_body.S"
